//! ONNX (opset 17, IR version 8) for the layout-free inference graph: [`write`] turns a
//! [`Graph`] (BatchNorm already folded) into a `ModelProto`, [`read`] parses one back into a
//! graph the engine compiles. The operators are the graph's own: `Conv` (dense and
//! depthwise), `ConvTranspose`, `Relu`/`Clip` after a convolution, `MaxPool` 2×2, `Concat`
//! on channels, `Add` and `DepthToSpace` (`CRD`, PyTorch's `PixelShuffle`). Input `image` is
//! float32 `[N, 3, H, W]`, normalized, with a dynamic batch `N`; output `logits` is
//! `[N, C, H, W]`. What a user needs around the tensors (normalization, class names, the
//! whole model spec) is in the model's metadata properties.
//!
//! An int8 version is written as QDQ ([`write_quantized`]): every convolution the engine runs
//! in int8 reads its input through `QuantizeLinear` → `DequantizeLinear` (uint8, per tensor, the
//! calibrated scale and zero point) and its weights as an int8 initializer through
//! `DequantizeLinear` (per output channel) — the same numbers the engine computes with.

pub mod proto;

use std::collections::HashMap;

use anyhow::{Context, Result, bail, ensure};
use prost::Message;

use super::blocks::{Act, ConvKind};
use crate::engine::Calibration;
use crate::engine::compile::runs_reduced;
use crate::engine::graph::{ConvOp, Graph, Node, NodeId, Op};
use crate::engine::int8::{activation_quant, quantize_weight, weight_scale};
use proto::*;

/// The opset segctl writes (and the newest it reads).
pub const OPSET: i64 = 17;
/// IR version of opset 17.
pub const IR_VERSION: i64 = 8;
/// Graph input and output names.
pub const INPUT_NAME: &str = "image";
pub const OUTPUT_NAME: &str = "logits";
/// Largest model file [`read`] accepts (weights of the biggest supported network are far less).
pub const MAX_MODEL_BYTES: usize = 1 << 30;

/// What goes around the graph: its input shape and metadata properties (key, value).
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Square input side.
    pub input_size: usize,
    pub num_classes: usize,
    pub model_version: i64,
    pub doc: String,
    pub metadata: Vec<(String, String)>,
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INTS, ints: v.to_vec(), ..Default::default() }
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::INT, i: v, ..Default::default() }
}

fn attr_string(name: &str, v: &str) -> AttributeProto {
    AttributeProto { name: name.into(), r#type: attribute_type::STRING, s: v.as_bytes().to_vec(), ..Default::default() }
}

fn tensor(name: &str, dims: &[usize], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.iter().map(|&d| d as i64).collect(),
        data_type: FLOAT,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn value_info(name: &str, dims: &[Option<usize>], batch: &str) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Some(v) => DimensionValue::DimValue(*v as i64),
                None => DimensionValue::DimParam(batch.into()),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto { tensor_type: Some(TypeProtoTensor { elem_type: FLOAT, shape: Some(TensorShapeProto { dim }) }) }),
        ..Default::default()
    }
}

fn node(op: &str, name: String, inputs: Vec<String>, output: String, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto { op_type: op.into(), name, input: inputs, output: vec![output], attribute, ..Default::default() }
}

fn bytes_tensor(name: &str, dims: &[usize], data_type: i32, raw_data: Vec<u8>) -> TensorProto {
    TensorProto { name: name.into(), dims: dims.iter().map(|&d| d as i64).collect(), data_type, raw_data, ..Default::default() }
}

/// The graph as an ONNX model file.
pub fn write(graph: &Graph, info: &ModelInfo) -> Result<Vec<u8>> {
    write_quantized(graph, info, None)
}

/// [`write`], with the convolutions an int8 plan of `calibration` runs in int8 as QDQ (see the
/// module docs); `None`: float throughout.
pub fn write_quantized(graph: &Graph, info: &ModelInfo, calibration: Option<&Calibration>) -> Result<Vec<u8>> {
    graph.channels().context("the graph is inconsistent")?;
    // The activations already quantized (one QuantizeLinear/DequantizeLinear per value).
    let mut quantized: HashMap<NodeId, String> = HashMap::new();
    let name = |id: NodeId| if id == 0 { INPUT_NAME.to_string() } else if id == graph.output { OUTPUT_NAME.to_string() } else { format!("n{id}") };
    let mut nodes = Vec::new();
    let mut initializers = Vec::new();
    let mut clip_bounds = false;
    for (id, n) in graph.nodes.iter().enumerate() {
        let inputs: Vec<String> = n.inputs.iter().map(|&i| name(i)).collect();
        let out = name(id);
        match &n.op {
            Op::Input { channels } => ensure!(id == 0 && *channels == 3, "node {id}: the input must be node 0 with 3 channels"),
            Op::Conv(c) => {
                let (wname, bname) = (format!("n{id}.weight"), format!("n{id}.bias"));
                let (dims, group, op) = match c.kind {
                    ConvKind::Dense => ([c.cout, c.cin, c.k, c.k], 1, "Conv"),
                    ConvKind::Depthwise => ([c.cin, 1, c.k, c.k], c.cin, "Conv"),
                    ConvKind::Transposed => ([c.cin, c.cout, c.k, c.k], 1, "ConvTranspose"),
                };
                ensure!(c.weight.len() == dims.iter().product::<usize>(), "node {id}: {} weights for {dims:?}", c.weight.len());
                ensure!(c.bias.len() == c.cout, "node {id}: {} biases for {} channels", c.bias.len(), c.cout);
                let up = if graph.consumers(id).iter().any(|&r| matches!(graph.nodes[r].op, Op::DepthToSpace(2))) { 2 } else { 1 };
                let range = calibration.filter(|_| runs_reduced(c, up)).and_then(|cal| cal.range(n.inputs[0]));
                let mut conv_input = inputs[0].clone();
                match range {
                    None => initializers.push(tensor(&wname, &dims, &c.weight)),
                    Some((lo, hi)) => {
                        let x = n.inputs[0];
                        conv_input = match quantized.get(&x) {
                            Some(dq) => dq.clone(),
                            None => {
                                let (scale, zero) = activation_quant(lo, hi);
                                let base = &inputs[0];
                                let (sname, zname, q, dq) = (format!("{base}.scale"), format!("{base}.zero_point"), format!("{base}.q"), format!("{base}.dq"));
                                initializers.push(tensor(&sname, &[], &[scale]));
                                initializers.push(bytes_tensor(&zname, &[], UINT8, vec![zero]));
                                nodes.push(node("QuantizeLinear", format!("{base}.quantize"), vec![base.clone(), sname.clone(), zname.clone()], q.clone(), vec![]));
                                nodes.push(node("DequantizeLinear", format!("{base}.dequantize"), vec![q, sname, zname], dq.clone(), vec![]));
                                quantized.insert(x, dq.clone());
                                dq
                            }
                        };
                        // Per output channel: axis 0 of [cout, cin, k, k], axis 1 of a transposed
                        // convolution's [cin, cout, k, k].
                        let (axis, channels) = if c.kind == ConvKind::Transposed { (1, c.cout) } else { (0, dims[0]) };
                        let per = c.weight.len() / channels;
                        let channel_of = |i: usize| if axis == 0 { i / per } else { (i / (c.k * c.k)) % c.cout };
                        let mut max_abs = vec![0f32; channels];
                        for (i, w) in c.weight.iter().enumerate() {
                            let ch = channel_of(i);
                            max_abs[ch] = max_abs[ch].max(w.abs());
                        }
                        let scales: Vec<f32> = max_abs.iter().map(|&m| weight_scale(m)).collect();
                        let q: Vec<u8> = c.weight.iter().enumerate().map(|(i, &w)| quantize_weight(w, scales[channel_of(i)]) as u8).collect();
                        let (qname, sname, zname) = (format!("n{id}.weight_quantized"), format!("n{id}.weight_scale"), format!("n{id}.weight_zero_point"));
                        initializers.push(bytes_tensor(&qname, &dims, INT8, q));
                        initializers.push(tensor(&sname, &[channels], &scales));
                        initializers.push(bytes_tensor(&zname, &[channels], INT8, vec![0; channels]));
                        nodes.push(node("DequantizeLinear", format!("n{id}.weight_dequantize"), vec![qname, sname, zname], wname.clone(), vec![attr_int("axis", axis)]));
                    }
                }
                initializers.push(tensor(&bname, &[c.cout], &c.bias));
                let (k, s, p) = (c.k as i64, c.stride as i64, c.pad as i64);
                let mut attrs = vec![attr_ints("kernel_shape", &[k, k]), attr_ints("strides", &[s, s]), attr_ints("pads", &[p, p, p, p]), attr_ints("dilations", &[1, 1])];
                attrs.push(attr_int("group", group as i64));
                let conv_out = if c.act == Act::Identity { out.clone() } else { format!("n{id}.conv") };
                nodes.push(node(op, format!("n{id}.{}", op.to_lowercase()), vec![conv_input, wname, bname], conv_out.clone(), attrs));
                match c.act {
                    Act::Identity => {}
                    Act::Relu => nodes.push(node("Relu", format!("n{id}.relu"), vec![conv_out], out, vec![])),
                    Act::Relu6 => {
                        clip_bounds = true;
                        nodes.push(node("Clip", format!("n{id}.relu6"), vec![conv_out, "relu6.min".into(), "relu6.max".into()], out, vec![]));
                    }
                }
            }
            Op::MaxPool2x2 => nodes.push(node("MaxPool", format!("n{id}.maxpool"), inputs, out, vec![attr_ints("kernel_shape", &[2, 2]), attr_ints("strides", &[2, 2])])),
            Op::Concat => nodes.push(node("Concat", format!("n{id}.concat"), inputs, out, vec![attr_int("axis", 1)])),
            Op::Add => nodes.push(node("Add", format!("n{id}.add"), inputs, out, vec![])),
            Op::DepthToSpace(r) => nodes.push(node(
                "DepthToSpace",
                format!("n{id}.depth_to_space"),
                inputs,
                out,
                vec![attr_int("blocksize", *r as i64), attr_string("mode", "CRD")],
            )),
        }
    }
    if clip_bounds {
        initializers.push(tensor("relu6.min", &[], &[0.0]));
        initializers.push(tensor("relu6.max", &[], &[6.0]));
    }
    let s = Some(info.input_size);
    let graph_proto = GraphProto {
        name: "segctl".into(),
        node: nodes,
        initializer: initializers,
        input: vec![value_info(INPUT_NAME, &[None, Some(3), s, s], "N")],
        output: vec![value_info(OUTPUT_NAME, &[None, Some(info.num_classes), s, s], "N")],
        doc_string: info.doc.clone(),
        ..Default::default()
    };
    let model = ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![OperatorSetIdProto { domain: String::new(), version: OPSET }],
        producer_name: "segctl".into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        domain: String::new(),
        model_version: info.model_version,
        doc_string: info.doc.clone(),
        graph: Some(graph_proto),
        metadata_props: info.metadata.iter().map(|(k, v)| StringStringEntryProto { key: k.clone(), value: v.clone() }).collect(),
    };
    Ok(model.encode_to_vec())
}

/// A model read back: its graph and metadata properties.
#[derive(Debug)]
pub struct ReadModel {
    pub graph: Graph,
    pub metadata: HashMap<String, String>,
    /// Input `[_, 3, H, W]` as declared (`None` for a symbolic dimension).
    pub input_dims: Vec<Option<i64>>,
}

fn floats(t: &TensorProto) -> Result<Vec<f32>> {
    ensure!(t.data_type == FLOAT, "initializer `{}` is not float32 (data type {})", t.name, t.data_type);
    let count: i64 = t.dims.iter().product();
    ensure!(t.dims.iter().all(|&d| d >= 0) && count <= (MAX_MODEL_BYTES / 4) as i64, "initializer `{}` has dims {:?}", t.name, t.dims);
    let values: Vec<f32> = if !t.raw_data.is_empty() {
        ensure!(t.raw_data.len() % 4 == 0, "initializer `{}`: raw data of {} bytes", t.name, t.raw_data.len());
        t.raw_data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    } else {
        t.float_data.clone()
    };
    ensure!(values.len() as i64 == count, "initializer `{}`: {} values for dims {:?}", t.name, values.len(), t.dims);
    Ok(values)
}

/// The f32 tensors of the graph's `DequantizeLinear` nodes over int8/uint8 initializers (per
/// tensor, or per channel along `axis`), named as the nodes' outputs.
fn dequantized_weights(graph: &GraphProto) -> Result<Vec<TensorProto>> {
    let inits: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for n in graph.node.iter().filter(|n| n.op_type == "DequantizeLinear") {
        let Some(q) = n.input.first().and_then(|i| inits.get(i.as_str())) else { continue };
        let what = format!("DequantizeLinear `{}`", n.name);
        ensure!(q.data_type == INT8 || q.data_type == UINT8, "{what}: data type {} (int8 or uint8 weights)", q.data_type);
        let count: i64 = q.dims.iter().product();
        ensure!(q.dims.iter().all(|&d| d >= 0) && q.raw_data.len() as i64 == count, "{what}: {} bytes for dims {:?}", q.raw_data.len(), q.dims);
        let scale = floats(inits.get(n.input.get(1).map(String::as_str).unwrap_or("")).with_context(|| format!("{what}: the scale must be an initializer"))?)?;
        let zero: Vec<i32> = match n.input.get(2).filter(|z| !z.is_empty()) {
            Some(z) => {
                let t = inits.get(z.as_str()).with_context(|| format!("{what}: the zero point must be an initializer"))?;
                ensure!(t.data_type == q.data_type, "{what}: zero point of data type {} for data of type {}", t.data_type, q.data_type);
                t.raw_data.iter().map(|&b| if q.data_type == INT8 { b as i8 as i32 } else { b as i32 }).collect()
            }
            None => vec![0; scale.len()],
        };
        ensure!(zero.len() == scale.len() && !scale.is_empty(), "{what}: {} scales, {} zero points", scale.len(), zero.len());
        let axis = attrs(n).get("axis").map_or(1, |a| a.i);
        let dims: Vec<usize> = q.dims.iter().map(|&d| d as usize).collect();
        let channel_of: Box<dyn Fn(usize) -> usize> = if scale.len() == 1 {
            Box::new(|_| 0)
        } else {
            ensure!((0..dims.len() as i64).contains(&axis) && dims[axis as usize] == scale.len(), "{what}: {} scales along axis {axis} of {dims:?}", scale.len());
            let inner: usize = dims[axis as usize + 1..].iter().product();
            let len = scale.len();
            Box::new(move |i| (i / inner) % len)
        };
        let values: Vec<f32> = q
            .raw_data
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                let v = if q.data_type == INT8 { b as i8 as i32 } else { b as i32 };
                let ch = channel_of(i);
                (v - zero[ch]) as f32 * scale[ch]
            })
            .collect();
        out.push(tensor(n.output.first().context("no output")?, &dims, &values));
    }
    Ok(out)
}

fn attrs(n: &NodeProto) -> HashMap<&str, &AttributeProto> {
    n.attribute.iter().map(|a| (a.name.as_str(), a)).collect()
}

/// Reads a model [`write`] produced (or an equivalent one from another tool, within the same
/// operator set) into a graph.
pub fn read(bytes: &[u8]) -> Result<ReadModel> {
    ensure!(bytes.len() <= MAX_MODEL_BYTES, "the ONNX file is {} bytes (at most {MAX_MODEL_BYTES})", bytes.len());
    let model = ModelProto::decode(bytes).context("not an ONNX model (protobuf decoding failed)")?;
    let opset = model.opset_import.iter().find(|o| o.domain.is_empty() || o.domain == "ai.onnx").map(|o| o.version).unwrap_or(0);
    ensure!((13..=OPSET).contains(&opset), "ONNX opset {opset}: segctl reads opsets 13 to {OPSET}");
    let graph = model.graph.context("the ONNX model has no graph")?;
    // QDQ weights: an int8 initializer through DequantizeLinear is read as the f32 weights it
    // stands for.
    let dequantized = dequantized_weights(&graph)?;
    let mut inits: HashMap<&str, &TensorProto> = graph.initializer.iter().map(|t| (t.name.as_str(), t)).collect();
    inits.extend(dequantized.iter().map(|t| (t.name.as_str(), t)));
    let real_inputs: Vec<&ValueInfoProto> = graph.input.iter().filter(|i| !inits.contains_key(i.name.as_str())).collect();
    ensure!(real_inputs.len() == 1, "the ONNX graph has {} inputs; segctl models have one image input", real_inputs.len());
    ensure!(graph.output.len() == 1, "the ONNX graph has {} outputs; segctl models have one (logits)", graph.output.len());
    let input_dims: Vec<Option<i64>> = real_inputs[0]
        .r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .and_then(|t| t.shape.as_ref())
        .map(|s| s.dim.iter().map(|d| match d.value { Some(DimensionValue::DimValue(v)) => Some(v), _ => None }).collect())
        .unwrap_or_default();
    ensure!(input_dims.len() == 4 && input_dims[1] == Some(3), "the input is {input_dims:?}, expected [N, 3, H, W]");

    // How often each value is read: an activation folds into its convolution only when it is
    // that convolution's one reader.
    let mut readers: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *readers.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *readers.entry(o.name.as_str()).or_default() += 1;
    }

    let mut nodes = vec![Node { op: Op::Input { channels: 3 }, inputs: vec![] }];
    let mut values: HashMap<String, NodeId> = HashMap::from([(real_inputs[0].name.clone(), 0)]);
    let value = |values: &HashMap<String, NodeId>, name: &str, op: &str| -> Result<NodeId> {
        values.get(name).copied().with_context(|| format!("{op} reads `{name}`, which no earlier node produces"))
    };
    for n in &graph.node {
        ensure!(n.domain.is_empty() || n.domain == "ai.onnx", "operator {}::{} is not supported", n.domain, n.op_type);
        ensure!(n.output.len() == 1, "{} `{}` has {} outputs", n.op_type, n.name, n.output.len());
        let a = attrs(n);
        let ints = |key: &str| a.get(key).map(|x| x.ints.clone());
        let int = |key: &str| a.get(key).map(|x| x.i);
        let what = format!("{} `{}`", n.op_type, n.name);
        let (op, inputs) = match n.op_type.as_str() {
            "DequantizeLinear" if dequantized.iter().any(|t| t.name == n.output[0]) => continue,
            // Activations through QuantizeLinear → DequantizeLinear: the engine reads the f32 map
            // (an int8 plan quantizes as it reads, with its own calibration).
            "QuantizeLinear" | "DequantizeLinear" => {
                let x = value(&values, n.input.first().context("no input")?, &what)?;
                values.insert(n.output[0].clone(), x);
                continue;
            }
            "Conv" | "ConvTranspose" => {
                let x = value(&values, n.input.first().context("no input")?, &what)?;
                let w = inits.get(n.input.get(1).map(String::as_str).unwrap_or("")).with_context(|| format!("{what}: the weight must be an initializer"))?;
                let weight = floats(w)?;
                ensure!(w.dims.len() == 4 && w.dims[2] == w.dims[3], "{what}: weight dims {:?}, expected a square 2-D kernel", w.dims);
                let k = w.dims[2] as usize;
                if let Some(ks) = ints("kernel_shape") {
                    ensure!(ks == [k as i64, k as i64], "{what}: kernel_shape {ks:?} against weight dims {:?}", w.dims);
                }
                let strides = ints("strides").unwrap_or(vec![1, 1]);
                ensure!(strides.len() == 2 && strides[0] == strides[1] && strides[0] >= 1, "{what}: strides {strides:?}");
                let pads = ints("pads").unwrap_or(vec![0, 0, 0, 0]);
                ensure!(pads.len() == 4 && pads.iter().all(|&p| p == pads[0] && p >= 0), "{what}: pads {pads:?} (only equal pads are supported)");
                ensure!(ints("dilations").is_none_or(|d| d.iter().all(|&v| v == 1)), "{what}: dilations are not supported");
                ensure!(a.get("auto_pad").is_none_or(|p| p.s.is_empty() || p.s == b"NOTSET"), "{what}: auto_pad is not supported");
                let group = int("group").unwrap_or(1) as usize;
                let (kind, cin, cout) = if n.op_type == "Conv" {
                    let (cout, per_group) = (w.dims[0] as usize, w.dims[1] as usize);
                    match group {
                        1 => (ConvKind::Dense, per_group, cout),
                        g if per_group == 1 && g == cout => (ConvKind::Depthwise, cout, cout),
                        g => bail!("{what}: group {g} is neither 1 nor depthwise"),
                    }
                } else {
                    ensure!(group == 1, "{what}: grouped transposed convolutions are not supported");
                    ensure!(ints("output_padding").is_none_or(|p| p.iter().all(|&v| v == 0)) && a.get("output_shape").is_none(), "{what}: output_padding/output_shape are not supported");
                    (ConvKind::Transposed, w.dims[0] as usize, w.dims[1] as usize)
                };
                let bias = match n.input.get(2).filter(|b| !b.is_empty()) {
                    Some(b) => floats(inits.get(b.as_str()).with_context(|| format!("{what}: the bias must be an initializer"))?)?,
                    None => vec![0.0; cout],
                };
                ensure!(bias.len() == cout, "{what}: {} biases for {cout} channels", bias.len());
                let conv = ConvOp { kind, cin, cout, k, stride: strides[0] as usize, pad: pads[0] as usize, weight, bias, act: Act::Identity };
                (Op::Conv(conv), vec![x])
            }
            "Relu" | "Clip" => {
                let x = value(&values, n.input.first().context("no input")?, &what)?;
                let act = if n.op_type == "Relu" {
                    Act::Relu
                } else {
                    let bound = |i: usize, attr: &str, default: f32| -> Result<f32> {
                        match n.input.get(i).filter(|s| !s.is_empty()) {
                            Some(name) => {
                                let t = floats(inits.get(name.as_str()).with_context(|| format!("{what}: bound `{name}` must be an initializer"))?)?;
                                ensure!(t.len() == 1, "{what}: bound `{name}` is not a scalar");
                                Ok(t[0])
                            }
                            None => Ok(a.get(attr).map(|x| x.f).unwrap_or(default)),
                        }
                    };
                    match (bound(1, "min", f32::NEG_INFINITY)?, bound(2, "max", f32::INFINITY)?) {
                        (lo, hi) if lo == 0.0 && hi == 6.0 => Act::Relu6,
                        (lo, hi) if lo == 0.0 && hi == f32::INFINITY => Act::Relu,
                        (lo, hi) => bail!("{what}: Clip to [{lo}, {hi}] is not supported (only ReLU and ReLU6)"),
                    }
                };
                let source = n.input[0].as_str();
                match nodes.get_mut(x) {
                    Some(Node { op: Op::Conv(c), .. }) if c.act == Act::Identity && readers.get(source) == Some(&1) => c.act = act,
                    _ => bail!("{what}: an activation is supported only as the one reader of a convolution"),
                }
                values.insert(n.output[0].clone(), x);
                continue;
            }
            "MaxPool" => {
                let x = value(&values, n.input.first().context("no input")?, &what)?;
                ensure!(ints("kernel_shape") == Some(vec![2, 2]) && ints("strides") == Some(vec![2, 2]), "{what}: only 2×2 pooling with stride 2 is supported");
                ensure!(ints("pads").is_none_or(|p| p.iter().all(|&v| v == 0)) && int("ceil_mode").unwrap_or(0) == 0, "{what}: padding or ceil_mode is not supported");
                ensure!(ints("dilations").is_none_or(|d| d.iter().all(|&v| v == 1)), "{what}: dilations are not supported");
                (Op::MaxPool2x2, vec![x])
            }
            "Concat" => {
                let axis = int("axis").context("Concat without axis")?;
                ensure!(axis == 1 || axis == -3, "{what}: only channel concatenation (axis 1) is supported");
                let xs = n.input.iter().map(|i| value(&values, i, &what)).collect::<Result<Vec<_>>>()?;
                (Op::Concat, xs)
            }
            "Add" => {
                ensure!(n.input.len() == 2, "{what}: {} inputs", n.input.len());
                let xs = n.input.iter().map(|i| value(&values, i, &what)).collect::<Result<Vec<_>>>()?;
                (Op::Add, xs)
            }
            "DepthToSpace" => {
                let x = value(&values, n.input.first().context("no input")?, &what)?;
                let mode = a.get("mode").map(|m| String::from_utf8_lossy(&m.s).into_owned()).unwrap_or_else(|| "DCR".into());
                ensure!(mode == "CRD", "{what}: mode {mode} is not supported (CRD, as PyTorch's PixelShuffle)");
                let r = int("blocksize").context("DepthToSpace without blocksize")?;
                ensure!((1..=16).contains(&r), "{what}: blocksize {r}");
                (Op::DepthToSpace(r as usize), vec![x])
            }
            other => bail!("ONNX operator `{other}` (node `{}`) is not supported by segctl's engine", n.name),
        };
        nodes.push(Node { op, inputs });
        values.insert(n.output[0].clone(), nodes.len() - 1);
    }
    let output = value(&values, &graph.output[0].name, "the graph output")?;
    let graph = Graph { nodes, output };
    graph.channels().context("the ONNX graph is inconsistent")?;
    let metadata = model.metadata_props.into_iter().map(|e| (e.key, e.value)).collect();
    Ok(ReadModel { graph, metadata, input_dims })
}

#[cfg(test)]
mod tests;
