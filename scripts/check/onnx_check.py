"""Checks an exported model.onnx with the ecosystem's own tools (used by tests/onnx.rs).

    python onnx_check.py MODEL.onnx INPUT.f32 N SIZE LOGITS.f32

INPUT.f32 holds N normalized images [N, 3, SIZE, SIZE] and LOGITS.f32 segctl's logits for them,
both little-endian float32. Runs onnx.checker (full_check), then onnxruntime's InferenceSession
at batch N and at batch 1 (the batch dimension is dynamic), and prints one JSON line:
{"checker": "ok", "max_abs_diff": ..., "scale": ..., "argmax_agreement": ..., "op_types": {...},
"metadata": {...}, "inputs": [...], "outputs": [...]}.
"""
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    path, input_path, n, size, logits_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    model = onnx.load(path)
    onnx.checker.check_model(model, full_check=True)
    x = np.fromfile(input_path, dtype="<f4").reshape(n, 3, size, size)
    expected = np.fromfile(logits_path, dtype="<f4")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x})
    expected = expected.reshape(got.shape)
    (single,) = session.run(["logits"], {"image": x[:1]})
    io = lambda values: [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
    print(json.dumps({
        "checker": "ok",
        "opset": model.opset_import[0].version,
        "max_abs_diff": float(np.abs(got - expected).max()),
        "batch1_max_abs_diff": float(np.abs(single - expected[:1]).max()),
        "scale": float(np.abs(expected).max()),
        "argmax_agreement": float((got.argmax(axis=1) == expected.argmax(axis=1)).mean()),
        "op_types": {t: sum(1 for n in model.graph.node if n.op_type == t) for t in sorted({n.op_type for n in model.graph.node})},
        "metadata": {p.key: p.value for p in model.metadata_props},
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
    }))


if __name__ == "__main__":
    main()
