//! Conv (lowered at import to a Gather of input windows and a MatMul) against onnxruntime on the
//! cases of `models/make_conv.py`: 1-D, 2-D and 3-D, strides, asymmetric pads, every auto_pad
//! mode, dilations, groups, depthwise, a patch embedding and a filter bank fed as an input. The
//! GPU and the reference executor must both match at 1e-5 relative, also after ONNX export and
//! re-import. (Gradients: tests/gradients.rs, `conv_rules`.)

mod common;

use common::*;
use dorac::tensor::Array;
use std::collections::BTreeMap;

const TOL: f64 = 1e-5;

/// Every case: (name, inputs, onnxruntime's Y).
fn cases() -> Vec<(String, BTreeMap<String, Array>, Array)> {
    let dir = models_dir().join("conv");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().to_string();
            name.strip_suffix(".onnx").map(str::to_string)
        })
        .collect();
    names.sort();
    assert!(names.len() >= 10, "conv cases: {names:?}");
    names
        .into_iter()
        .map(|name| {
            let mut io = read("conv", &format!("{name}.safetensors"));
            let y = io.remove("Y").unwrap();
            (name, io, y)
        })
        .collect()
}

#[test]
fn conv_matches_onnxruntime_on_gpu_and_reference() {
    for (name, inputs, want) in cases() {
        let path = models_dir().join("conv").join(format!("{name}.onnx"));
        let g = load_path(&path, &inputs);
        let expect: BTreeMap<String, Array> = [("Y".to_string(), want.clone())].into();
        let bytes = prost::Message::encode_to_vec(&dorac::onnx::export(&g).unwrap());
        let back = dorac::onnx::decode_model(&bytes, &name).unwrap();
        let shapes = inputs
            .iter()
            .map(|(k, v)| (k.clone(), v.shape.clone()))
            .collect();
        let g2 = dorac::onnx::import(
            &back,
            std::path::Path::new("."),
            &dorac::onnx::ShapePins::default(),
            &shapes,
        )
        .unwrap();
        for (how, graph) in [("imported", &g), ("re-imported", &g2)] {
            let gpu = run_gpu(graph, &inputs);
            let cpu = run_reference(graph, &inputs);
            assert_eq!(gpu["Y"].shape, want.shape, "{name} {how}");
            assert_eq!(cpu["Y"].shape, want.shape, "{name} {how}");
            let (eg, ec) = (rel(&gpu, &expect, "Y"), rel(&cpu, &expect, "Y"));
            println!("{name} {how}: gpu {eg:.2e}, reference {ec:.2e}");
            assert!(
                eg < TOL && ec < TOL,
                "{name} {how}: gpu {eg:e}, reference {ec:e}"
            );
        }
    }
}

/// Malformed convolutions are refused with the node's name and what was expected.
#[test]
fn bad_convs_are_clear_errors() {
    let path = models_dir().join("conv/conv2d_pads.onnx");
    let mut model = dorac::onnx::load_model(&path).unwrap();
    for (attr, value, expect) in [
        ("group", 2, "group 2 does not fit"),
        ("group", 0, "group is 0"),
    ] {
        let mut m = model.clone();
        let n = &mut m.graph.as_mut().unwrap().node[0];
        n.attribute.retain(|a| a.name() != attr);
        n.attribute.push(dorac::onnx::proto::AttributeProto {
            name: Some(attr.into()),
            r#type: Some(dorac::onnx::proto::attribute_proto::AttributeType::Int as i32),
            i: Some(value),
            ..Default::default()
        });
        let err = import_model(&m).unwrap_err().to_string();
        assert!(err.contains("/conv/Conv") && err.contains(expect), "{err}");
    }
    let node = &mut model.graph.as_mut().unwrap().node[0];
    node.attribute.retain(|a| a.name() != "pads");
    node.attribute.push(dorac::onnx::proto::AttributeProto {
        name: Some("pads".into()),
        r#type: Some(dorac::onnx::proto::attribute_proto::AttributeType::Ints as i32),
        ints: vec![1, 1],
        ..Default::default()
    });
    let err = import_model(&model).unwrap_err().to_string();
    assert!(err.contains("pads has 2 entries, expected 4"), "{err}");
}

fn import_model(m: &dorac::onnx::proto::ModelProto) -> dorac::error::Result<dorac::ir::Graph> {
    let shapes = [("X".to_string(), vec![2, 3, 7, 7])].into();
    dorac::onnx::import(
        m,
        std::path::Path::new("."),
        &dorac::onnx::ShapePins::default(),
        &shapes,
    )
}
