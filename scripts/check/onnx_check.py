"""Checks an exported model.onnx with the ecosystem's own tools (used by tests/onnx.rs).

    python onnx_check.py MODEL.onnx INPUT.f32 N SIZE LOGITS.f32

INPUT.f32 holds N normalized images [N, 3, SIZE, SIZE] and LOGITS.f32 segctl's logits for them,
both little-endian float32. Runs onnx.checker (full_check), then onnxruntime's InferenceSession
at batch N and at batch 1 (the batch dimension is dynamic), and prints one JSON line:
{"checker": "ok", "max_abs_diff": ..., "reference_max_abs_diff": ... (basic optimizations only:
QDQ run as written, in float), "scale": ..., "argmax_agreement": ..., "op_types": {...},
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
    # onnxruntime's reference semantics of QDQ: with only basic graph optimizations, every
    # DequantizeLinear -> Conv -> QuantizeLinear runs as written, in float (no fused int8
    # kernel). On a CPU without VNNI, the fused U8S8 kernels multiply with vpmaddubsw, whose
    # 16-bit pair sums saturate (onnxruntime's docs advise `reduce_range` there), so only this
    # run is comparable to an exact int8 engine on such a CPU.
    basic = ort.SessionOptions()
    basic.intra_op_num_threads = 1
    basic.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    (reference,) = ort.InferenceSession(path, basic, providers=["CPUExecutionProvider"]).run(["logits"], {"image": x})
    io = lambda values: [{"name": v.name, "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]} for v in values]
    print(json.dumps({
        "checker": "ok",
        "opset": model.opset_import[0].version,
        "max_abs_diff": float(np.abs(got - expected).max()),
        "batch1_max_abs_diff": float(np.abs(single - expected[:1]).max()),
        "reference_max_abs_diff": float(np.abs(reference - expected).max()),
        "reference_argmax_agreement": float((reference.argmax(axis=1) == expected.argmax(axis=1)).mean()),
        "scale": float(np.abs(expected).max()),
        "argmax_agreement": float((got.argmax(axis=1) == expected.argmax(axis=1)).mean()),
        "op_types": {t: sum(1 for n in model.graph.node if n.op_type == t) for t in sorted({n.op_type for n in model.graph.node})},
        "metadata": {p.key: p.value for p in model.metadata_props},
        "inputs": io(model.graph.input),
        "outputs": io(model.graph.output),
    }))


if __name__ == "__main__":
    main()
