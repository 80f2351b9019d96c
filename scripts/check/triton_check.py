"""Talks to `segctl serve` with Triton's own client (tritonclient[http]), for tests/oip.rs.

    python triton_check.py URL MODEL PHOTO.jpg PIXELS.png

Sends the JPEG's bytes as BYTES (binary tensor data) and the pixels of PIXELS.png (the same
photo, decoded by segctl's decoder and stored losslessly) as UINT8 (once as JSON, once binary), asks for the mask (binary output, then JSON) and the
probabilities, and prints one JSON line with what came back: shapes, the masks as lists, the
probabilities' sums and argmax agreement. The caller compares the masks with `segctl predict`.
"""
import json
import sys

import numpy as np
import tritonclient.http as httpclient
from PIL import Image


def main():
    url, model, photo, pixels_png = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    client = httpclient.InferenceServerClient(url=url.removeprefix("http://"), verbose=False)
    report = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        "missing_ready": client.is_model_ready("no-such-model"),
        "server": client.get_server_metadata(),
        "metadata": client.get_model_metadata(model),
    }
    jpeg = open(photo, "rb").read()
    pixels = np.asarray(Image.open(pixels_png).convert("RGB"), dtype=np.uint8)[None]

    # JPEG bytes, binary request, binary mask output.
    inp = httpclient.InferInput("image_bytes", [1], "BYTES")
    inp.set_data_from_numpy(np.array([jpeg], dtype=np.object_), binary_data=True)
    res = client.infer(model, [inp], outputs=[httpclient.InferRequestedOutput("mask", binary_data=True)])
    mask = res.as_numpy("mask")
    report["bytes_binary"] = {"shape": list(mask.shape), "dtype": str(mask.dtype), "mask": mask[0].tolist()}

    # Raw pixels as JSON, mask as JSON and probabilities as binary.
    inp = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=False)
    res = client.infer(model, [inp], outputs=[
        httpclient.InferRequestedOutput("mask", binary_data=False),
        httpclient.InferRequestedOutput("probabilities", binary_data=True),
    ])
    mask = res.as_numpy("mask")
    probs = res.as_numpy("probabilities")
    report["pixels_json"] = {
        "shape": list(mask.shape),
        "mask": mask[0].tolist(),
        "probabilities_shape": list(probs.shape),
        "probabilities_sum_error": float(np.abs(probs.sum(axis=1) - 1).max()),
        "argmax_agrees": float((probs.argmax(axis=1) == mask).mean()),
    }

    # Raw pixels as binary; a version given explicitly.
    inp = httpclient.InferInput("image", list(pixels.shape), "UINT8")
    inp.set_data_from_numpy(pixels, binary_data=True)
    res = client.infer(model, [inp], model_version="1", outputs=[httpclient.InferRequestedOutput("mask", binary_data=True)])
    report["pixels_binary"] = {"mask": res.as_numpy("mask")[0].tolist()}

    # A wrong datatype: the protocol's error.
    try:
        bad = httpclient.InferInput("image", [1, 2, 2, 3], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 2, 2, 3), dtype=np.float32))
        client.infer(model, [bad])
        report["error"] = None
    except Exception as e:  # tritonclient raises InferenceServerException
        report["error"] = str(e)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
