//! ONNX round trips: the graph read back is the graph written (same logits from the engine,
//! bit for bit), and what segctl cannot run is refused with the operator's name.

use std::sync::Arc;

use super::*;
use crate::config::{Arch, Config};
use crate::engine::{Plan, PlanOptions, Session};
use crate::model::{ModelSpec, ModelState};
use crate::util::rng::Rng;

fn graph_of(arch: Arch, size: usize) -> Graph {
    let mut config = Config::default();
    config.data.image_size = size;
    config.model.arch = arch;
    config.model.unet.depth = 2;
    config.model.unet.base_width = 4;
    let state = ModelState::new(&ModelSpec::from_config(&config), &candle_core::Device::Cpu, 3).unwrap();
    state.model.lower().unwrap()
}

fn info(size: usize) -> ModelInfo {
    ModelInfo { input_size: size, num_classes: 3, model_version: 1, doc: "test".into(), metadata: vec![("class_names".into(), "[\"pet\"]".into())] }
}

fn run(graph: &Graph, size: usize, input: &[f32], n: usize) -> Vec<f32> {
    let plan = Arc::new(Plan::compile(graph, &PlanOptions::new(size, size)).unwrap());
    let mut session = Session::new(plan, 1).unwrap();
    session.run(input, n).unwrap().to_vec()
}

#[test]
fn both_architectures_round_trip_to_the_same_logits() {
    for (arch, size) in [(Arch::Unet, 32), (Arch::Mobilenetv2Unet, 64)] {
        let graph = graph_of(arch, size);
        let bytes = write(&graph, &info(size)).unwrap();
        let back = read(&bytes).unwrap();
        assert_eq!(back.graph.nodes.len(), graph.nodes.len(), "{arch:?}: activations fold back into their convolutions");
        assert_eq!(back.metadata["class_names"], "[\"pet\"]");
        assert_eq!(back.input_dims, vec![None, Some(3), Some(size as i64), Some(size as i64)]);
        let mut rng = Rng::new(9);
        let input: Vec<f32> = (0..2 * 3 * size * size).map(|_| rng.normal()).collect();
        assert_eq!(run(&graph, size, &input, 2), run(&back.graph, size, &input, 2), "{arch:?}");
    }
}

#[test]
fn the_file_declares_opset_17_and_a_dynamic_batch() {
    let bytes = write(&graph_of(Arch::Unet, 32), &info(32)).unwrap();
    let model = ModelProto::decode(bytes.as_slice()).unwrap();
    assert_eq!(model.ir_version, IR_VERSION);
    assert_eq!(model.opset_import[0].version, 17);
    let g = model.graph.unwrap();
    let dims = &g.input[0].r#type.as_ref().unwrap().tensor_type.as_ref().unwrap().shape.as_ref().unwrap().dim;
    assert_eq!(dims[0].value, Some(DimensionValue::DimParam("N".into())));
    assert_eq!(g.input[0].name, INPUT_NAME);
    assert_eq!(g.output[0].name, OUTPUT_NAME);
    let ops: std::collections::BTreeSet<&str> = g.node.iter().map(|n| n.op_type.as_str()).collect();
    for op in ["Conv", "Relu", "MaxPool", "Concat"] {
        assert!(ops.contains(op), "{op} missing from {ops:?}");
    }
}

#[test]
fn what_the_engine_cannot_run_is_refused_by_name() {
    let bytes = write(&graph_of(Arch::Unet, 32), &info(32)).unwrap();
    let mut model = ModelProto::decode(bytes.as_slice()).unwrap();
    let g = model.graph.as_mut().unwrap();
    let relu = g.node.iter().position(|n| n.op_type == "Relu").unwrap();
    g.node[relu].op_type = "Sigmoid".into();
    let err = read(&model.encode_to_vec()).unwrap_err().to_string();
    assert!(err.contains("`Sigmoid`"), "{err}");
    assert!(read(b"\x08\x08garbage").is_err());
    let mut old = ModelProto::decode(bytes.as_slice()).unwrap();
    old.opset_import[0].version = 9;
    assert!(format!("{:#}", read(&old.encode_to_vec()).unwrap_err()).contains("opset 9"));
}
