//! ONNX front end and back end: importing the test models, round trips through export, and the
//! error paths (malformed files, dangling names, cycles, unsupported ops, external data, shapes).

use dorac::ir::{
    unary, AdaptedLayer, Binary, Graph, GraphBuilder, LinearKind, Method, Op, Patch, Reduce,
};
use dorac::onnx::proto::{
    self, attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, ModelProto, NodeProto, TensorProto, ValueInfoProto,
};
use dorac::onnx::{export, import, load_model, parse_shape_arg, save_model, ShapePins};
use dorac::tensor::{Array, DType, Tensor};
use dorac::Error;
use prost::Message;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

fn model_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
        .join("model.onnx")
}

/// A temp folder unique to this process and test, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(test: &str) -> Self {
        let p = std::env::temp_dir().join(format!("dorac-onnx-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pins(p: &[(&str, usize)]) -> HashMap<String, usize> {
    p.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

fn no_pins() -> HashMap<String, usize> {
    HashMap::new()
}

fn no_shapes() -> HashMap<String, Vec<usize>> {
    HashMap::new()
}

fn import_file(name: &str, p: &[(&str, usize)]) -> Graph {
    let path = model_path(name);
    let model = load_model(&path).unwrap();
    import(&model, path.parent().unwrap(), &pins(p), &no_shapes()).unwrap()
}

fn count_ops(g: &Graph) -> HashMap<&'static str, usize> {
    let mut m = HashMap::new();
    for n in g.petgraph().node_weights() {
        *m.entry(n.op.name()).or_insert(0) += 1;
    }
    m
}

/// export -> encode -> decode -> import.
fn round_trip(g: &Graph) -> Graph {
    let model = export(g).unwrap();
    let bytes = model.encode_to_vec();
    let back = ModelProto::decode(&bytes[..]).unwrap();
    import(&back, Path::new("."), &no_pins(), &no_shapes()).unwrap()
}

// ---- small model builders ----

fn vi(name: &str, dims: &[Result<i64, &str>]) -> ValueInfoProto {
    vi_typed(name, dims, DataType::Float)
}

fn vi_typed(name: &str, dims: &[Result<i64, &str>], elem: DataType) -> ValueInfoProto {
    use tensor_shape_proto::dimension::Value;
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(proto::TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem as i32),
                shape: Some(proto::TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|d| tensor_shape_proto::Dimension {
                            value: Some(match d {
                                Ok(v) => Value::DimValue(*v),
                                Err(p) => Value::DimParam(p.to_string()),
                            }),
                            ..Default::default()
                        })
                        .collect(),
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.into()),
        name: Some(name.into()),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn with_attr(mut n: NodeProto, a: AttributeProto) -> NodeProto {
    n.attribute.push(a);
    n
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn f32_init(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        raw_data: Some(
            v.iter()
                .flat_map(|x| x.to_le_bytes())
                .collect::<Vec<u8>>()
                .into(),
        ),
        ..Default::default()
    }
}

fn i64_init(name: &str, v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: vec![v.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn model(
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    opset: i64,
) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![proto::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(opset),
        }],
        producer_name: Some("test".into()),
        graph: Some(proto::GraphProto {
            name: Some("g".into()),
            node: nodes,
            initializer: inits,
            input: inputs,
            output: outputs,
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn import_err(m: &ModelProto) -> Error {
    import(m, Path::new("."), &no_pins(), &no_shapes()).unwrap_err()
}

// ---- the test models ----

#[test]
fn imports_mlp2d_with_a_batch_pin() {
    let g = import_file("mlp2d", &[("batch", 3)]);
    assert_eq!(g.inputs().len(), 1);
    let x = g.node(g.inputs()[0]);
    assert_eq!((x.name.as_str(), x.shape.as_slice()), ("x", &[3, 16][..]));
    assert_eq!(g.outputs().len(), 1);
    let (name, y) = &g.outputs()[0];
    assert_eq!(name, "y");
    assert_eq!(g.shape(*y), &[3, 4]);
    assert_eq!(
        g.node(*y).op,
        Op::Gemm {
            alpha: 1.0,
            beta: 1.0,
            trans_a: false,
            trans_b: true
        }
    );
    assert_eq!(g.node(*y).label, "/head/Gemm");
    let ops = count_ops(&g);
    assert_eq!(ops["gemm"], 3);
    assert_eq!(ops["div"], 1);
    assert_eq!(ops["erf"], 1);
    assert_eq!(ops["add"], 1);
    assert_eq!(ops["mul"], 2);
    assert_eq!(ops["tanh"], 1);
    // 3 weights + 3 biases + 3 scalar Constants.
    assert_eq!(ops["const"], 9);
    assert_eq!(g.info.opset, 17);
    assert_eq!(g.info.ir_version, 8);
    assert_eq!(g.info.producer, "pytorch");
    assert_eq!(
        g.info.input_dims["x"],
        vec![Some("batch".to_string()), None]
    );
    // Constant nodes keep their ONNX node name as label.
    let c = g
        .find_by_name("/layers/layers.1/Constant_output_0")
        .unwrap();
    assert_eq!(g.node(c).label, "/layers/layers.1/Constant");
    assert_eq!(g.const_tensor(c).unwrap().shape, Vec::<usize>::new());
    let w = g.find_by_name("layers.0.weight").unwrap();
    assert_eq!(g.shape(w), &[32, 16]);
}

#[test]
fn imports_mlp3d() {
    let g = import_file("mlp3d", &[]);
    let x = g.node(g.inputs()[0]);
    assert_eq!(x.shape, vec![2, 5, 16]);
    let (name, y) = &g.outputs()[0];
    assert_eq!(name, "y");
    assert_eq!(g.node(*y).op, Op::Softmax { axis: 2 });
    assert_eq!(g.shape(*y), &[2, 5, 8]);
    let ops = count_ops(&g);
    assert_eq!(ops["matmul"], 4);
    assert_eq!(ops["add"], 6);
    assert_eq!(ops["layer_norm"], 1);
    assert_eq!(ops["relu"], 1);
    assert_eq!(ops["sigmoid"], 2);
    assert_eq!(ops["mul"], 2);
    assert_eq!(ops["softmax"], 1);
    let ln = g
        .petgraph()
        .node_indices()
        .find(|&n| matches!(g.node(n).op, Op::LayerNorm { .. }))
        .unwrap();
    match g.node(ln).op {
        Op::LayerNorm { axis, epsilon } => {
            assert_eq!(axis, 2);
            assert!((epsilon - 1e-5).abs() < 1e-9);
        }
        _ => unreachable!(),
    }
    assert_eq!(g.inputs_of(ln).len(), 3);
    assert_eq!(g.node(ln).label, "/norm/LayerNormalization");
    let mm = g.find_by_name("/proj_in/MatMul_output_0").unwrap();
    assert_eq!(g.shape(mm), &[2, 5, 32]);
    assert_eq!(g.node(g.inputs_of(mm)[1]).name, "onnx::MatMul_34");
}

#[test]
fn round_trip_gives_the_same_ir() {
    for (name, p) in [("mlp2d", vec![("batch", 3)]), ("mlp3d", vec![])] {
        let g = import_file(name, &p);
        let back = round_trip(&g);
        assert_eq!(format!("{g}"), format!("{back}"), "{name}");
        // And the exported model is stable.
        let a = export(&g).unwrap().encode_to_vec();
        let b = export(&back).unwrap().encode_to_vec();
        assert_eq!(
            a, b,
            "{name}: export is not deterministic across a round trip"
        );
    }
}

#[test]
fn export_writes_static_shapes_opset_and_initializers() {
    let g = import_file("mlp2d", &[("batch", 3)]);
    let m = export(&g).unwrap();
    assert_eq!(m.producer_name(), "dorac");
    assert_eq!(m.ir_version(), 8);
    assert_eq!(m.opset_import[0].version(), 17);
    let gp = m.graph.as_ref().unwrap();
    let dims = |v: &ValueInfoProto| match &v.r#type.as_ref().unwrap().value {
        Some(type_proto::Value::TensorType(t)) => t
            .shape
            .as_ref()
            .unwrap()
            .dim
            .iter()
            .map(|d| match d.value {
                Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                _ => -1,
            })
            .collect::<Vec<_>>(),
        _ => panic!("not a tensor"),
    };
    assert_eq!(gp.input[0].name(), "x");
    assert_eq!(dims(&gp.input[0]), vec![3, 16]);
    assert_eq!(gp.output[0].name(), "y");
    assert_eq!(dims(&gp.output[0]), vec![3, 4]);
    assert!(gp.initializer.iter().all(|t| t.raw_data.is_some()));
    let names: HashSet<&str> = gp.initializer.iter().map(|t| t.name()).collect();
    assert!(names.contains("layers.0.weight"));
    let gemm = gp.node.iter().find(|n| n.name() == "/head/Gemm").unwrap();
    assert_eq!(gemm.output, vec!["y".to_string()]);
}

/// A rewritten graph (StopGradient, Gelu, Reshape, ReduceSum, adapter record) survives
/// export and import: after one trip the IR text is a fixed point and the adapter is restored.
#[test]
fn adapters_and_stop_gradient_round_trip() {
    let mut g = import_file("mlp3d", &[]);
    let mut p = Patch::new(&g);
    let mm = g.find_by_name("/proj_in/MatMul_output_0").unwrap();
    let x = g.inputs_of(mm)[0].into();
    let w = g.inputs_of(mm)[1].into();
    let a = p.constant("lora_A", Tensor::f32(vec![4, 16], vec![0.01; 64]));
    let b = p.constant("lora_B", Tensor::f32(vec![32, 4], vec![0.02; 128]));
    let m = p.constant("magnitude", Tensor::f32(vec![32], vec![1.0; 32]));
    let sg = p
        .add(
            Op::StopGradient,
            &[mm.into()],
            "sg_out",
            "dora/stop_gradient",
        )
        .unwrap();
    let gelu = p
        .add(Op::Unary(unary::GELU_TANH), &[sg], "gelu_out", "dora/gelu")
        .unwrap();
    let r = p
        .add(
            Op::Reshape {
                shape: vec![10, 32],
            },
            &[gelu],
            "flat",
            "dora/reshape",
        )
        .unwrap();
    let s = p
        .add(
            Op::Reduce {
                kind: Reduce::Sum,
                axes: vec![0],
                keepdims: false,
            },
            &[r],
            "flat_sum",
            "dora/sum",
        )
        .unwrap();
    let back = p
        .add(
            Op::Reshape { shape: vec![32] },
            &[s],
            "sum_vec",
            "dora/reshape",
        )
        .unwrap();
    let out = p
        .add(
            Op::Binary(dorac::ir::Binary::Mul),
            &[mm.into(), back],
            "scaled",
            "dora/mul",
        )
        .unwrap();
    // The users of mm outside the patch read the scaled value.
    p.replace(mm, out);
    p.add_output("extra", out);
    p.record_adapter(AdaptedLayer {
        module: "proj_in".into(),
        method: Method::Dora,
        rank: 4,
        alpha: 8.0,
        rslora: false,
        in_features: 16,
        out_features: 32,
        kind: LinearKind::MatMul,
        base_label: "/proj_in/MatMul".into(),
        x,
        weight: w,
        bias: None,
        lora_a: a,
        lora_b: b,
        magnitude: Some(m),
        output: out,
        norm_sq: None,
    });
    g.apply(p.finish());

    let model = export(&g).unwrap();
    let gp = model.graph.as_ref().unwrap();
    // Gelu is decomposed; StopGradient is an Identity listed in the metadata.
    assert!(gp.node.iter().all(|n| n.op_type() != "Gelu"));
    let sg_nodes: Vec<&NodeProto> = gp
        .node
        .iter()
        .filter(|n| n.op_type() == "Identity")
        .collect();
    assert_eq!(sg_nodes.len(), 1);
    assert_eq!(sg_nodes[0].name(), "dora/stop_gradient");
    // Two nodes share a label: names are made unique.
    let names: Vec<&str> = gp.node.iter().map(|n| n.name()).collect();
    let unique: HashSet<&str> = names.iter().copied().collect();
    assert_eq!(names.len(), unique.len());
    let meta: HashMap<&str, &str> = model
        .metadata_props
        .iter()
        .map(|p| (p.key(), p.value()))
        .collect();
    assert_eq!(meta["dorac.stop_gradient"], r#"["dora/stop_gradient"]"#);
    let adapters: serde_json::Value = serde_json::from_str(meta["dorac.adapters"]).unwrap();
    assert_eq!(adapters[0]["module"], "proj_in");
    assert_eq!(adapters[0]["kind"]["op"], "MatMul");
    assert_eq!(adapters[0]["output"], "extra");
    assert_eq!(adapters[0]["bias"], serde_json::Value::Null);

    let g1 = round_trip(&g);
    let g2 = round_trip(&g1);
    assert_eq!(format!("{g1}"), format!("{g2}"));
    let ops = count_ops(&g1);
    assert_eq!(ops["stop_gradient"], 1);
    assert_eq!(ops["reshape"], 2);
    assert_eq!(ops["reduce_sum"], 1);
    assert_eq!(g1.adapters().len(), 1);
    let ad = &g1.adapters()[0];
    assert_eq!(ad.module, "proj_in");
    assert_eq!(ad.method, Method::Dora);
    assert_eq!(g1.node(ad.lora_a).name, "lora_A");
    assert_eq!(g1.node(ad.magnitude.unwrap()).name, "magnitude");
    assert_eq!(g1.node(ad.weight).name, "onnx::MatMul_34");
    assert_eq!(g1.node(ad.x).name, "x");
    assert_eq!(g1.outputs()[1].0, "extra");
    assert_eq!(ad.output, g1.outputs()[1].1);
}

// ---- loading and saving ----

#[test]
fn truncated_and_random_files_are_not_models() {
    let dir = TempDir::new("truncated");
    let bytes = std::fs::read(model_path("mlp2d")).unwrap();
    let cut = dir.path().join("cut.onnx");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model(&cut).unwrap_err().to_string();
    assert!(
        e.contains("cut.onnx") && e.contains("not an ONNX model"),
        "{e}"
    );

    let mut rng = dorac::tensor::Rng::new(7);
    let noise: Vec<u8> = (0..4096).map(|_| rng.next_u64() as u8).collect();
    let rnd = dir.path().join("random.onnx");
    std::fs::write(&rnd, &noise).unwrap();
    let e = load_model(&rnd).unwrap_err().to_string();
    assert!(
        e.contains("random.onnx") && e.contains("not an ONNX model"),
        "{e}"
    );

    let empty = dir.path().join("empty.onnx");
    std::fs::write(&empty, b"").unwrap();
    let e = load_model(&empty).unwrap_err().to_string();
    assert!(e.contains("not an ONNX model"), "{e}");

    let e = load_model(&dir.path().join("absent.onnx")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");

    // A model without a graph.
    let no_graph = dir.path().join("nograph.onnx");
    let m = ModelProto {
        ir_version: Some(8),
        ..Default::default()
    };
    std::fs::write(&no_graph, m.encode_to_vec()).unwrap();
    let e = load_model(&no_graph).unwrap_err().to_string();
    assert!(e.contains("no graph"), "{e}");
}

#[test]
fn save_model_writes_atomically_and_reloads() {
    let dir = TempDir::new("save");
    let g = import_file("mlp3d", &[]);
    let m = export(&g).unwrap();
    let path = dir.path().join("out.onnx");
    save_model(&m, &path).unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(leftovers, vec![std::ffi::OsString::from("out.onnx")]);
    let back = load_model(&path).unwrap();
    assert_eq!(back, m);
    // A folder that does not exist: an Io error naming the path, no temp file left anywhere.
    let e = save_model(&m, &dir.path().join("no/such/out.onnx")).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

// ---- structural errors ----

#[test]
fn missing_initializer_names_node_and_value() {
    let m = model(
        vec![node("MatMul", "/fc/MatMul", &["x", "fc.weight"], &["y"])],
        vec![],
        vec![vi("x", &[Ok(2), Ok(4)])],
        vec![vi("y", &[Ok(2), Ok(3)])],
        17,
    );
    let e = import_err(&m).to_string();
    assert!(
        e.contains(
            "node '/fc/MatMul' reads 'fc.weight', which no initializer, graph input or node \
             produces"
        ),
        "{e}"
    );
}

#[test]
fn cycle_is_reported_with_its_nodes() {
    let m = model(
        vec![
            node("Relu", "start", &["x"], &["s"]),
            node("Add", "a", &["s", "b_out"], &["a_out"]),
            node("Relu", "b", &["a_out"], &["b_out"]),
            node("Relu", "after", &["b_out"], &["y"]),
        ],
        vec![],
        vec![vi("x", &[Ok(2)])],
        vec![vi("y", &[Ok(2)])],
        17,
    );
    let e = import_err(&m);
    assert!(matches!(e, Error::Graph { .. }));
    assert!(
        e.to_string()
            .contains("the graph has a cycle through nodes: a, b"),
        "{e}"
    );
}

#[test]
fn unsupported_ops_are_listed_in_one_error() {
    let m = model(
        vec![
            node("Loop", "/a/Loop", &["x"], &["l1"]),
            node("Scan", "s1", &["l1"], &["s"]),
            node("Loop", "/b/Loop", &["s"], &["y"]),
        ],
        vec![],
        vec![vi("x", &[Ok(2)])],
        vec![vi("y", &[Ok(2)])],
        17,
    );
    let e = import_err(&m);
    assert_eq!(
        e.to_string(),
        "unsupported ONNX ops: Loop (nodes: /a/Loop, /b/Loop); Scan (nodes: s1)"
    );
}

#[test]
fn other_domains_and_string_inputs_are_refused() {
    let mut fused = node("FusedMatMul", "f", &["x", "ids"], &["y"]);
    fused.domain = Some("com.microsoft".into());
    let m = model(
        vec![fused],
        vec![],
        vec![
            vi("x", &[Ok(2)]),
            vi_typed("ids", &[Ok(2)], DataType::String),
        ],
        vec![vi("y", &[Ok(2)])],
        17,
    );
    let e = import_err(&m).to_string();
    assert!(
        e.contains("FusedMatMul (domain 'com.microsoft') (nodes: f)")
            && e.contains("string graph inputs (inputs: ids)"),
        "{e}"
    );
}

/// A shape fed as a graph input is refused without its value, with a hint; given its value at
/// import (as `dorac run` gives its inputs' values), it is used as a constant and the input
/// stays a graph input.
#[test]
fn shape_inputs_are_pinned_from_given_values() {
    let m = model(
        vec![
            node("Reshape", "r", &["x", "shape"], &["y"]),
            node("Add", "a", &["shape", "shape"], &["twice"]),
        ],
        vec![],
        vec![
            vi("x", &[Ok(2), Ok(6)]),
            vi_typed("shape", &[Ok(3)], DataType::Int64),
        ],
        vec![
            vi("y", &[Ok(3), Ok(2), Ok(2)]),
            vi_typed("twice", &[Ok(3)], DataType::Int64),
        ],
        17,
    );
    let e = import_err(&m).to_string();
    assert!(
        e.contains("Reshape with a shape computed from graph inputs"),
        "{e}"
    );
    assert!(e.contains("give the input's value"), "{e}");
    let values = HashMap::from([(
        "shape".to_string(),
        Array::new(vec![3], vec![3.0, -1.0, 2.0]),
    )]);
    let g = dorac::onnx::import_with_values(&m, Path::new("."), &no_pins(), &no_shapes(), &values)
        .unwrap();
    let y = g.outputs().iter().find(|(n, _)| n == "y").unwrap().1;
    assert_eq!(g.shape(y), &[3, 2, 2]);
    // The input is still an input, and its other uses still read it at run time.
    assert_eq!(g.inputs().len(), 2);
    let inputs = HashMap::from([
        (
            "x".to_string(),
            Array::new(vec![2, 6], (0..12).map(f64::from).collect()),
        ),
        (
            "shape".to_string(),
            Array::new(vec![3], vec![3.0, -1.0, 2.0]),
        ),
    ]);
    let out = dorac::reference::run(&g, &inputs).unwrap();
    assert_eq!(out["twice"].data, vec![6.0, -2.0, 4.0]);
}

fn branch(
    name: &str,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    outputs: &[&str],
) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Graph as i32),
        g: Some(proto::GraphProto {
            name: Some(name.into()),
            node: nodes,
            initializer: inits,
            output: outputs.iter().map(|o| vi(o, &[Ok(2)])).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// An If whose condition is known at import (Optimum's merged decoders branch on a graph input,
/// `use_cache_branch`) imports as the branch it takes: the branches read values of the enclosing
/// scopes and have initializers of their own, and an If nested in a branch, on a Constant, is
/// inlined too. Without the condition's value, or with a malformed branch, the node is named.
#[test]
fn ifs_take_the_branch_their_condition_names() {
    let make = |then_outputs: &[&str]| {
        let nested = with_attr(
            with_attr(
                node("If", "/inner/If", &["always"], &["e"]),
                branch(
                    "then_branch",
                    vec![node("Sub", "/inner/Sub", &["xw", "x"], &["d"])],
                    vec![],
                    &["d"],
                ),
            ),
            branch(
                "else_branch",
                vec![node("Neg", "/inner/Neg", &["x"], &["n"])],
                vec![],
                &["n"],
            ),
        );
        let mut always = node("Constant", "/inner/Constant", &[], &["always"]);
        always.attribute.push(AttributeProto {
            name: Some("value".into()),
            r#type: Some(AttributeType::Tensor as i32),
            t: Some(TensorProto {
                dims: vec![],
                data_type: Some(DataType::Bool as i32),
                int32_data: vec![1],
                ..Default::default()
            }),
            ..Default::default()
        });
        let outer_if = with_attr(
            with_attr(
                node("If", "/outer/If", &["use_cache"], &["y"]),
                branch(
                    "then_branch",
                    vec![node("Add", "/then/Add", &["xw", "one"], &["t"])],
                    vec![f32_init("one", &[2], &[1.0, 1.0])],
                    then_outputs,
                ),
            ),
            branch("else_branch", vec![always, nested], vec![], &["e"]),
        );
        model(
            vec![node("Mul", "/Mul", &["x", "w"], &["xw"]), outer_if],
            vec![f32_init("w", &[2], &[10.0, 20.0])],
            vec![
                vi("x", &[Ok(2)]),
                vi_typed("use_cache", &[Ok(1)], DataType::Bool),
            ],
            vec![vi("y", &[Ok(2)])],
            17,
        )
    };
    let m = make(&["t"]);
    let x = Array::new(vec![2], vec![1.0, 2.0]);
    for (cond, want) in [(1.0, vec![11.0, 41.0]), (0.0, vec![9.0, 38.0])] {
        let values = HashMap::from([("use_cache".to_string(), Array::new(vec![1], vec![cond]))]);
        let g =
            dorac::onnx::import_with_values(&m, Path::new("."), &no_pins(), &no_shapes(), &values)
                .unwrap();
        let inputs = HashMap::from([
            ("x".to_string(), x.clone()),
            ("use_cache".to_string(), values["use_cache"].clone()),
        ]);
        let out = dorac::reference::run(&g, &inputs).unwrap();
        assert_eq!(out["y"].data, want, "condition {cond}");
    }
    let e = import_err(&m).to_string();
    assert!(
        e.contains("If with a condition computed from graph inputs") && e.contains("/outer/If"),
        "{e}"
    );

    let values = HashMap::from([("use_cache".to_string(), Array::new(vec![1], vec![1.0]))]);
    let e = dorac::onnx::import_with_values(
        &make(&["t", "xw"]),
        Path::new("."),
        &no_pins(),
        &no_shapes(),
        &values,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("/outer/If") && e.contains("then_branch has 2 outputs, the node 1"),
        "{e}"
    );

    // An op dorac lacks inside a branch is listed with the others.
    let mut m = make(&["t"]);
    let outer = &mut m.graph.as_mut().unwrap().node[1];
    outer.attribute[0].g.as_mut().unwrap().node[0].op_type = Some("Loop".into());
    assert_eq!(
        import_err(&m).to_string(),
        "unsupported ONNX ops: Loop (nodes: /then/Add)"
    );
}

/// An attribute no builder reads could change the result: it is refused by name, not ignored.
#[test]
fn unread_attributes_are_refused() {
    let n = with_attr(
        node("Relu", "r", &["x"], &["y"]),
        AttributeProto {
            name: Some("broadcast".into()),
            r#type: Some(AttributeType::Int as i32),
            i: Some(1),
            ..Default::default()
        },
    );
    let m = model(
        vec![n],
        vec![],
        vec![vi("x", &[Ok(3)])],
        vec![vi("y", &[Ok(3)])],
        17,
    );
    let e = import_err(&m);
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    let e = e.to_string();
    assert!(
        e.contains("Relu with attribute 'broadcast'") && e.contains("(nodes: r)"),
        "{e}"
    );
}

/// LayerNormalization's Mean and InvStdDev outputs, when used, are computed (from a sum, a
/// division and a square root; the normalisation itself stays one op), with the reduced axes
/// kept as dims of size 1.
#[test]
fn used_layer_norm_statistics_are_computed() {
    let m = model(
        vec![
            node(
                "LayerNormalization",
                "ln",
                &["x", "s"],
                &["y", "mean", "inv"],
            ),
            node("Relu", "r", &["mean"], &["z"]),
        ],
        vec![f32_init("s", &[4], &[1.0; 4])],
        vec![vi("x", &[Ok(2), Ok(4)])],
        vec![
            vi("y", &[Ok(2), Ok(4)]),
            vi("z", &[Ok(2), Ok(1)]),
            vi("inv", &[Ok(2), Ok(1)]),
        ],
        17,
    );
    let g = import(&m, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    let x = [1.0, 2.0, 3.0, 6.0, -1.0, -1.0, 1.0, 1.0];
    let inputs = HashMap::from([("x".to_string(), Array::new(vec![2, 4], x.to_vec()))]);
    let out = dorac::reference::run(&g, &inputs).unwrap();
    assert_eq!(out["z"].shape, vec![2, 1]);
    assert_eq!(out["z"].data, vec![3.0, 0.0]);
    let eps = 1e-5f32 as f64;
    let want = [1.0 / (3.5f64 + eps).sqrt(), 1.0 / (1.0 + eps).sqrt()];
    assert_eq!(out["inv"].shape, vec![2, 1]);
    for (a, b) in out["inv"].data.iter().zip(want) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
}

// ---- shapes ----

#[test]
fn unpinned_symbolic_dim_says_how_to_pin_it() {
    let path = model_path("mlp2d");
    let m = load_model(&path).unwrap();
    let e = import(&m, path.parent().unwrap(), &no_pins(), &no_shapes()).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::Input { .. }));
    assert!(
        msg.contains("input 'x'")
            && msg.contains("'batch'")
            && msg.contains("--shape batch=N")
            && msg.contains("--shape x=Nx16"),
        "{msg}"
    );
}

/// Optimum names the length of a decoder's attention mask `past_sequence_length +
/// sequence_length`: such a dim is sized from its terms, which `--shape` can pin even where no
/// input has them as a dim of their own; unsized, the error names the terms to pin.
#[test]
fn dims_that_are_sums_of_dims_are_sized_from_their_terms() {
    let m = model(
        vec![node("Identity", "i", &["attention_mask"], &["y"])],
        vec![],
        vec![vi(
            "attention_mask",
            &[
                Err("batch_size"),
                Err("past_sequence_length + sequence_length"),
            ],
        )],
        vec![vi(
            "y",
            &[
                Err("batch_size"),
                Err("past_sequence_length + sequence_length"),
            ],
        )],
        17,
    );
    let pins = dorac::onnx::ShapePins::parse(&[
        "batch_size=2",
        "past_sequence_length=3",
        "sequence_length=5",
    ])
    .unwrap();
    let g = import(&m, Path::new("."), &pins, &no_shapes()).unwrap();
    assert_eq!(g.shape(g.inputs()[0]), &[2, 8]);

    let pins = dorac::onnx::ShapePins::parse(&["batch_size=2", "sequence_length=5"]).unwrap();
    let e = import(&m, Path::new("."), &pins, &no_shapes())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'past_sequence_length + sequence_length'")
            && e.contains("pin its terms with --shape past_sequence_length=N,")
            && e.contains("--shape attention_mask=2xN"),
        "{e}"
    );
}

#[test]
fn input_shapes_take_precedence_and_must_fit() {
    let path = model_path("mlp2d");
    let m = load_model(&path).unwrap();
    let dir = path.parent().unwrap();
    let shapes: HashMap<String, Vec<usize>> = [("x".to_string(), vec![5, 16])].into();
    let g = import(&m, dir, &no_pins(), &shapes).unwrap();
    assert_eq!(g.shape(g.outputs()[0].1), &[5, 4]);

    let bad: HashMap<String, Vec<usize>> = [("x".to_string(), vec![5, 17])].into();
    let e = import(&m, dir, &no_pins(), &bad).unwrap_err().to_string();
    assert!(
        e.contains("input 'x'") && e.contains("[5, 17]") && e.contains("[batch, 16]"),
        "{e}"
    );

    let e = import(&m, dir, &pins(&[("batch", 3)]), &shapes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--shape batch=3"), "{e}");
}

#[test]
fn shape_args_parse_and_sort_into_dims_and_inputs() {
    assert_eq!(
        parse_shape_arg("x=3x16").unwrap(),
        ("x".to_string(), vec![3, 16])
    );
    assert_eq!(
        parse_shape_arg("batch=3").unwrap(),
        ("batch".to_string(), vec![3])
    );
    for bad in ["x", "=3", "x=", "x=3xq", "x=-1"] {
        let e = parse_shape_arg(bad).unwrap_err().to_string();
        assert!(e.contains("--shape"), "{bad}: {e}");
    }
    let e = ShapePins::parse(&["batch=3", "batch=4"])
        .unwrap_err()
        .to_string();
    assert!(e.contains("twice"), "{e}");

    let path = model_path("mlp2d");
    let m = load_model(&path).unwrap();
    let resolve = |args: &[&str]| ShapePins::parse(args).and_then(|p| p.resolve(&m));
    let (dims, shapes) = resolve(&["batch=4"]).unwrap();
    assert_eq!((dims, shapes), (pins(&[("batch", 4)]), HashMap::new()));
    let (dims, shapes) = resolve(&["x=2x16"]).unwrap();
    assert!(dims.is_empty());
    assert_eq!(shapes["x"], vec![2, 16]);
    let e = resolve(&["btach=4"]).unwrap_err().to_string();
    assert!(
        e.contains("inputs: x") && e.contains("symbolic dims: batch"),
        "{e}"
    );
    let e = resolve(&["batch=4x2"]).unwrap_err().to_string();
    assert!(e.contains("one size"), "{e}");

    // import with ShapePins: --shape pins plus the shapes of supplied tensors, which must agree.
    let dir = path.parent().unwrap();
    let g = import(
        &m,
        dir,
        &ShapePins::parse(&["batch=2"]).unwrap(),
        &no_shapes(),
    )
    .unwrap();
    assert_eq!(g.shape(g.inputs()[0]), &[2, 16]);
    let by_input = ShapePins::parse(&["x=6x16"]).unwrap();
    let g = import(&m, dir, &by_input, &no_shapes()).unwrap();
    assert_eq!(g.shape(g.outputs()[0].1), &[6, 4]);
    let tensors: HashMap<String, Vec<usize>> = [("x".to_string(), vec![6, 16])].into();
    assert!(import(&m, dir, &by_input, &tensors).is_ok());
    let tensors: HashMap<String, Vec<usize>> = [("x".to_string(), vec![7, 16])].into();
    let e = import(&m, dir, &by_input, &tensors)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--shape x=6x16") && e.contains("7x16"), "{e}");
}

// ---- ops ----

#[test]
fn shape_ops_resolve_at_import() {
    // x[2,3,4] -> Reshape(0,-1) -> [2,12] -> Transpose -> [12,2] -> Flatten(axis=0) -> [1,24]
    // -> ReduceSum(axes=[-1], keepdims=0) -> [1]; Constant value_ints feeds the shape.
    let shape_const = with_attr(
        node("Constant", "shape_c", &[], &["shape"]),
        attr_ints("value_ints", &[0, -1]),
    );
    let m = model(
        vec![
            node("Reshape", "r", &["x", "shape"], &["r_out"]),
            shape_const,
            node("Transpose", "t", &["r_out"], &["t_out"]),
            with_attr(
                node("Flatten", "f", &["t_out"], &["f_out"]),
                attr_i("axis", 0),
            ),
            with_attr(
                node("ReduceSum", "s", &["f_out", "axes"], &["y"]),
                attr_i("keepdims", 0),
            ),
        ],
        vec![i64_init("axes", &[-1])],
        vec![vi("x", &[Ok(2), Ok(3), Ok(4)])],
        vec![vi("y", &[Ok(1)])],
        17,
    );
    let g = import(&m, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    let ops: Vec<Op> = g
        .topo_order()
        .unwrap()
        .into_iter()
        .map(|n| g.node(n).op.clone())
        .collect();
    assert_eq!(
        ops,
        vec![
            Op::Input,
            Op::Reshape { shape: vec![2, 12] },
            Op::Transpose { perm: vec![1, 0] },
            Op::Reshape { shape: vec![1, 24] },
            Op::Reduce {
                kind: Reduce::Sum,
                axes: vec![1],
                keepdims: false
            },
        ]
    );
    // int64 constants were consumed and dropped.
    assert_eq!(g.petgraph().node_count(), 5);
    assert_eq!(g.shape(g.outputs()[0].1), &[1]);
    let back = round_trip(&g);
    assert_eq!(format!("{g}"), format!("{back}"));

    // ReduceSum before opset 13 takes axes from an attribute.
    let m11 = model(
        vec![with_attr(
            node("ReduceSum", "s", &["x"], &["y"]),
            attr_ints("axes", &[0, 2]),
        )],
        vec![],
        vec![vi("x", &[Ok(2), Ok(3), Ok(4)])],
        vec![vi("y", &[Ok(1), Ok(3), Ok(1)])],
        11,
    );
    let g = import(&m11, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    assert_eq!(
        g.node(g.outputs()[0].1).op,
        Op::Reduce {
            kind: Reduce::Sum,
            axes: vec![0, 2],
            keepdims: true
        }
    );
}

#[test]
fn reshape_of_a_computed_shape_is_unsupported() {
    let m = model(
        vec![
            node("Relu", "r", &["s"], &["s2"]),
            node("Reshape", "reshape", &["x", "s2"], &["y"]),
        ],
        vec![],
        vec![vi("x", &[Ok(4)]), vi("s", &[Ok(2)])],
        vec![vi("y", &[Ok(2), Ok(2)])],
        17,
    );
    let e = import_err(&m).to_string();
    assert!(e.contains("Reshape") && e.contains("reshape"), "{e}");
}

#[test]
fn old_softmax_only_on_the_last_axis() {
    let mk = |axis: i64| {
        model(
            vec![with_attr(
                node("Softmax", "sm", &["x"], &["y"]),
                attr_i("axis", axis),
            )],
            vec![],
            vec![vi("x", &[Ok(2), Ok(3), Ok(4)])],
            vec![vi("y", &[Ok(2), Ok(3), Ok(4)])],
            11,
        )
    };
    let g = import(&mk(-1), Path::new("."), &no_pins(), &no_shapes()).unwrap();
    assert_eq!(g.node(g.outputs()[0].1).op, Op::Softmax { axis: 2 });
    let e = import_err(&mk(1));
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}

#[test]
fn gelu_and_constants() {
    let approx = with_attr(
        node("Gelu", "g", &["x"], &["y"]),
        AttributeProto {
            name: Some("approximate".into()),
            r#type: Some(AttributeType::String as i32),
            s: Some(b"tanh".to_vec()),
            ..Default::default()
        },
    );
    let c = with_attr(
        node("Constant", "c", &[], &["half"]),
        AttributeProto {
            name: Some("value_float".into()),
            r#type: Some(AttributeType::Float as i32),
            f: Some(0.5),
            ..Default::default()
        },
    );
    let m = model(
        vec![approx, c, node("Mul", "m", &["y", "half"], &["z"])],
        vec![],
        vec![vi("x", &[Ok(3)])],
        vec![vi("z", &[Ok(3)])],
        20,
    );
    let g = import(&m, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    let gelu = g.find_by_name("y").unwrap();
    assert_eq!(g.node(gelu).op, Op::Unary(unary::GELU_TANH));
    let half = g.find_by_name("half").unwrap();
    assert_eq!(g.const_tensor(half).unwrap(), &Tensor::scalar(0.5));
    // Export keeps the opset (20), which has the Gelu op: a round trip keeps one node.
    let out = export(&g).unwrap();
    assert_eq!(out.opset_import[0].version(), 20);
    let gelu = out
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .find(|n| n.op_type() == "Gelu");
    let approximate = gelu
        .unwrap()
        .attribute
        .iter()
        .find(|a| a.name() == "approximate");
    assert_eq!(approximate.unwrap().s(), b"tanh");
    // Below opset 20 Gelu is written as its formula.
    let mut g17 = g.clone();
    g17.info.opset = 17;
    let out = export(&g17).unwrap();
    let types: Vec<&str> = out
        .graph
        .as_ref()
        .unwrap()
        .node
        .iter()
        .map(|n| n.op_type())
        .collect();
    assert!(
        types.contains(&"Tanh") && !types.contains(&"Gelu"),
        "{types:?}"
    );
}

#[test]
fn initializer_listed_as_input_is_a_constant() {
    let m = model(
        vec![node("Add", "add", &["x", "b"], &["y"])],
        vec![f32_init("b", &[2], &[1.0, 2.0])],
        vec![vi("x", &[Ok(2)]), vi("b", &[Ok(2)])],
        vec![vi("y", &[Ok(2)])],
        17,
    );
    let g = import(&m, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    assert_eq!(g.inputs().len(), 1);
    let b = g.find_by_name("b").unwrap();
    assert_eq!(g.const_tensor(b).unwrap().as_f32().unwrap(), &[1.0, 2.0]);
}

// ---- external data ----

fn external(name: &str, location: &str, offset: usize, dims: &[i64]) -> TensorProto {
    let entry = |k: &str, v: String| proto::StringStringEntryProto {
        key: Some(k.into()),
        value: Some(v),
    };
    let n: i64 = dims.iter().product();
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        data_location: Some(proto::tensor_proto::DataLocation::External as i32),
        external_data: vec![
            entry("location", location.into()),
            entry("offset", offset.to_string()),
            entry("length", (n * 4).to_string()),
        ],
        ..Default::default()
    }
}

fn external_model(location: &str) -> ModelProto {
    model(
        vec![node("MatMul", "mm", &["x", "w"], &["y"])],
        vec![external("w", location, 8, &[2, 3])],
        vec![vi("x", &[Ok(1), Ok(2)])],
        vec![vi("y", &[Ok(1), Ok(3)])],
        17,
    )
}

#[test]
fn external_data_is_read_from_the_model_folder() {
    let dir = TempDir::new("external");
    let w: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mut bytes = vec![0xAAu8; 8];
    bytes.extend(w.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/weights.bin"), &bytes).unwrap();
    let path = dir.path().join("model.onnx");
    save_model(&external_model("data/weights.bin"), &path).unwrap();

    let m = load_model(&path).unwrap();
    let g = import(&m, path.parent().unwrap(), &no_pins(), &no_shapes()).unwrap();
    let wn = g.find_by_name("w").unwrap();
    assert_eq!(g.const_tensor(wn).unwrap().as_f32().unwrap(), &w[..]);

    // Leaving the folder, absolute paths, missing and short files: errors naming the tensor.
    std::fs::write(dir.path().join("short.bin"), [0u8; 12]).unwrap();
    let outside = dir.path().join("escape.bin");
    std::fs::write(&outside, &bytes).unwrap();
    let inner = dir.path().join("inner");
    std::fs::create_dir_all(&inner).unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("../escape.bin".into(), "leaves the model's folder"),
        (outside.display().to_string(), "absolute path"),
        ("missing.bin".into(), "cannot open external data file"),
        ("short.bin".into(), "the file is short"),
    ];
    for (loc, expect) in cases {
        let e = import(&external_model(&loc), &inner, &no_pins(), &no_shapes());
        if loc == "short.bin" || loc == "missing.bin" {
            // These two live in (or are looked up in) the main folder.
            let e = import(&external_model(&loc), dir.path(), &no_pins(), &no_shapes())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("initializer 'w'") && e.contains(expect),
                "{loc}: {e}"
            );
            continue;
        }
        let e = e.unwrap_err().to_string();
        assert!(
            e.contains("initializer 'w'") && e.contains(expect),
            "{loc}: {e}"
        );
    }

    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(&outside, inner.join("link.bin")).unwrap();
        let e = import(
            &external_model("link.bin"),
            &inner,
            &no_pins(),
            &no_shapes(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("initializer 'w'") && e.contains("outside the model's folder"),
            "{e}"
        );
        // A FIFO would block the reader for ever; a hard link may be a file outside the folder.
        let fifo = inner.join("fifo.bin");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status();
        assert!(made.is_ok_and(|s| s.success()), "mkfifo");
        std::fs::hard_link(&outside, inner.join("hard.bin")).unwrap();
        for (loc, expect) in [
            ("fifo.bin", "not a regular file"),
            ("hard.bin", "hard links"),
        ] {
            let e = import(&external_model(loc), &inner, &no_pins(), &no_shapes())
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("initializer 'w'") && e.contains(expect),
                "{loc}: {e}"
            );
        }
    }
}

// ---- transformer ops: integer and bool values, shape computations, multiple outputs ----

fn i64_tensor(name: &str, dims: &[i64], v: &[i64]) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(DataType::Int64 as i32),
        int64_data: v.to_vec(),
        ..Default::default()
    }
}

fn typed_tensor(name: &str, dims: &[i64], data_type: DataType, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.into()),
        dims: dims.to_vec(),
        data_type: Some(data_type as i32),
        raw_data: Some(raw.into()),
        ..Default::default()
    }
}

fn attr_t(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    }
}

/// A Constant node holding `t`.
fn constant(output: &str, t: TensorProto) -> NodeProto {
    with_attr(node("Constant", output, &[], &[output]), attr_t("value", t))
}

fn import_ok(m: &ModelProto) -> Graph {
    import(m, Path::new("."), &no_pins(), &no_shapes()).unwrap()
}

/// Runs the reference on `(input, values)` pairs (shapes from the graph).
fn eval(g: &Graph, feeds: &[(&str, Vec<f64>)]) -> HashMap<String, Array> {
    let inputs = feeds
        .iter()
        .map(|(name, v)| {
            let id = g.find_by_name(name).unwrap();
            (
                name.to_string(),
                Array::new(g.shape(id).to_vec(), v.clone()),
            )
        })
        .collect();
    dorac::reference::run(g, &inputs).unwrap()
}

/// Export and import give the same IR text, and the same values on `feeds`.
fn assert_round_trip(g: &Graph, feeds: &[(&str, Vec<f64>)]) -> Graph {
    let back = round_trip(g);
    assert_eq!(format!("{g}"), format!("{back}"));
    assert_eq!(eval(g, feeds), eval(&back, feeds));
    back
}

fn ops_in_order(g: &Graph) -> Vec<&'static str> {
    g.topo_order()
        .unwrap()
        .into_iter()
        .map(|n| g.node(n).op.name())
        .collect()
}

#[test]
fn shape_gather_concat_reshape_folds_at_import() {
    // x[2, 3, 4] -> Reshape(x, Concat(Gather(Shape(x), 0), Unsqueeze(Mul(Gather(Shape(x), [1]),
    // Shape(x, start=-1))), ...)): the pattern of a dynamic-axes export; also Size, integer Div.
    let nodes = vec![
        node("Shape", "shape", &["x"], &["s"]),
        constant("zero", i64_tensor("zero", &[], &[0])),
        node("Gather", "batch", &["s", "zero"], &["b"]),
        with_attr(node("Shape", "tail", &["x"], &["t"]), attr_i("start", -1)),
        constant("one", i64_tensor("one", &[1], &[1])),
        node("Gather", "rows", &["s", "one"], &["r"]),
        node("Mul", "mul", &["r", "t"], &["rt"]),
        node("Size", "size", &["x"], &["n"]),
        constant("two", i64_tensor("two", &[], &[2])),
        node("Div", "half", &["n", "two"], &["h"]),
        node("Unsqueeze", "unsq", &["b", "ax0"], &["b1"]),
        node("Concat", "cat", &["b1", "rt"], &["target"]),
        node("Reshape", "reshape", &["x", "target"], &["y"]),
        node("Unsqueeze", "unsq2", &["h", "ax0"], &["h1"]),
        constant("two1", i64_tensor("two1", &[1], &[2])),
        node("Concat", "cat2", &["two1", "h1"], &["target2"]),
        node("Reshape", "reshape2", &["x", "target2"], &["z"]),
    ];
    let nodes: Vec<NodeProto> = nodes
        .into_iter()
        .map(|n| {
            if n.op_type() == "Concat" {
                with_attr(n, attr_i("axis", 0))
            } else {
                n
            }
        })
        .collect();
    let m = model(
        nodes,
        vec![i64_init("ax0", &[0])],
        vec![vi("x", &[Ok(2), Ok(3), Ok(4)])],
        vec![vi("y", &[Ok(2), Ok(12)]), vi("z", &[Ok(2), Ok(12)])],
        15,
    );
    let g = import_ok(&m);
    // Only the input and two reshapes are left: every shape computation was a constant.
    assert_eq!(g.petgraph().node_count(), 3, "{g}");
    assert_eq!(
        g.node(g.outputs()[0].1).op,
        Op::Reshape { shape: vec![2, 12] }
    );
    assert_eq!(
        g.node(g.outputs()[1].1).op,
        Op::Reshape { shape: vec![2, 12] }
    );
    let x: Vec<f64> = (0..24).map(f64::from).collect();
    assert_round_trip(&g, &[("x", x)]);
}

#[test]
fn int64_and_bool_inputs_masks_and_embeddings() {
    // ids int64 [2, 3] -> Gather(table) ; mask int64 -> Cast(bool) -> Not -> Where(-1e4, 0)
    // -> Unsqueeze -> Add to the embedding sum; Equal(ids, 0) as a second (bool) output.
    let table: Vec<f32> = (0..15).map(|i| i as f32).collect();
    let m = model(
        vec![
            node("Gather", "embed", &["table", "ids"], &["e"]),
            with_attr(node("Cast", "to_bool", &["mask"], &["mb"]), attr_i("to", 9)),
            node("Not", "not", &["mb"], &["pad"]),
            node("Where", "where", &["pad", "neg", "zero"], &["bias"]),
            node("Unsqueeze", "unsq", &["bias", "last"], &["bias3"]),
            node("Add", "add", &["e", "bias3"], &["y"]),
            node("Equal", "eq", &["ids", "zero_id"], &["is_pad"]),
            node("And", "and", &["is_pad", "flag"], &["both"]),
        ],
        vec![
            f32_init("table", &[5, 3], &table),
            f32_init("neg", &[], &[-1e4]),
            f32_init("zero", &[], &[0.0]),
            i64_init("last", &[-1]),
            i64_tensor("zero_id", &[], &[0]),
        ],
        vec![
            vi_typed("ids", &[Ok(2), Ok(3)], DataType::Int64),
            vi_typed("mask", &[Ok(2), Ok(3)], DataType::Int64),
            vi_typed("flag", &[Ok(1)], DataType::Bool),
        ],
        vec![
            vi("y", &[Ok(2), Ok(3), Ok(3)]),
            vi_typed("both", &[Ok(2), Ok(3)], DataType::Bool),
        ],
        17,
    );
    let g = import_ok(&m);
    let dtype = |name: &str| g.node(g.find_by_name(name).unwrap()).dtype;
    assert_eq!(dtype("ids"), DType::I64);
    assert_eq!(dtype("flag"), DType::Bool);
    assert_eq!(dtype("mb"), DType::Bool);
    assert_eq!(dtype("is_pad"), DType::Bool);
    assert_eq!(dtype("y"), DType::F32);
    let feeds = [
        ("ids", vec![1.0, -1.0, 0.0, 4.0, 2.0, 0.0]),
        ("mask", vec![1.0, 1.0, 1.0, 1.0, 1.0, 0.0]),
        ("flag", vec![1.0]),
    ];
    let out = eval(&g, &feeds);
    // Row 1: table[1]; row 2: table[-1] = table[4]; last position padded.
    assert_eq!(out["y"].data[..6], [3.0, 4.0, 5.0, 12.0, 13.0, 14.0]);
    assert_eq!(out["y"].data[15..], [-1e4, -1e4 + 1.0, -1e4 + 2.0]);
    assert_eq!(out["both"].data, vec![0.0, 0.0, 1.0, 0.0, 0.0, 1.0]);
    let back = assert_round_trip(&g, &feeds);
    // The exported inputs and outputs keep their types.
    let m = export(&back).unwrap();
    let elem = |v: &ValueInfoProto| match &v.r#type.as_ref().unwrap().value {
        Some(type_proto::Value::TensorType(t)) => t.elem_type(),
        _ => panic!("not a tensor"),
    };
    let gp = m.graph.unwrap();
    let types: Vec<i32> = gp.input.iter().chain(&gp.output).map(elem).collect();
    let want = [
        DataType::Int64,
        DataType::Int64,
        DataType::Bool,
        DataType::Float,
    ];
    let want: Vec<i32> = want
        .iter()
        .chain([&DataType::Bool])
        .map(|&t| t as i32)
        .collect();
    assert_eq!(types, want);
}

#[test]
fn masks_of_constants_fold_at_import() {
    // The causal mask of a legacy GPT-2 export: LessOrEqual of two constant ranges, a bool
    // ConstantOfShape, And, Cast; Range with a computed limit; Trilu of it; Expand with a
    // bidirectional shape; all constants, folded (the float Where of them is left to the fold pass).
    let t_true = typed_tensor("one", &[1], DataType::Bool, vec![1]);
    let nodes = vec![
        node("Shape", "shape", &["x"], &["s"]),
        node("Gather", "len", &["s", "one_idx"], &["n"]),
        node("Range", "range", &["zero", "n", "step"], &["pos"]),
        node("Unsqueeze", "queries", &["pos", "ax1"], &["query"]),
        node("Unsqueeze", "keys", &["pos", "ax0"], &["key"]),
        node("LessOrEqual", "le", &["key", "query"], &["causal"]),
        with_attr(
            node("ConstantOfShape", "ones", &["dims"], &["all"]),
            attr_t("value", t_true),
        ),
        node("And", "and", &["all", "causal"], &["mask"]),
        with_attr(node("Cast", "cast", &["mask"], &["maskf"]), attr_i("to", 1)),
        node("Trilu", "tril", &["maskf", "k"], &["lower"]),
        node("Expand", "expand", &["lower", "big"], &["lower3"]),
        node("Add", "add", &["x", "lower3"], &["y"]),
    ];
    let nodes: Vec<NodeProto> = nodes
        .into_iter()
        .map(|n| match n.op_type() {
            "Trilu" => with_attr(n, attr_i("upper", 0)),
            _ => n,
        })
        .collect();
    let m = model(
        nodes,
        vec![
            i64_tensor("one_idx", &[], &[1]),
            i64_tensor("zero", &[], &[0]),
            i64_tensor("step", &[], &[1]),
            i64_init("ax0", &[0]),
            i64_init("ax1", &[1]),
            i64_init("dims", &[4, 4]),
            i64_tensor("k", &[], &[-1]),
            i64_init("big", &[2, 1, 1]),
        ],
        vec![vi("x", &[Ok(2), Ok(4), Ok(4)])],
        vec![vi("y", &[Ok(2), Ok(4), Ok(4)])],
        17,
    );
    let g = import_ok(&m);
    let ops = count_ops(&g);
    // Float ops on constants stay for the fold pass: Cast (a view), Trilu, Expand.
    for gone in ["less_or_equal", "and", "gather", "slice", "concat"] {
        assert!(!ops.contains_key(gone), "{gone} left in\n{g}");
    }
    let mask = g.find_by_name("mask").unwrap();
    let t = g.const_tensor(mask).unwrap();
    assert_eq!(t.dtype(), DType::Bool);
    // Key position j <= query position i: the lower triangle, diagonal included.
    let lower = [
        1., 0., 0., 0., 1., 1., 0., 0., 1., 1., 1., 0., 1., 1., 1., 1.,
    ];
    assert_eq!(t.to_f64(), lower);
    let x = vec![0.0; 32];
    let out = eval(&g, &[("x", x.clone())]);
    // Trilu(lower, k = -1) keeps its part strictly below the diagonal, for both batch entries.
    let strict = [
        0., 0., 0., 0., 1., 0., 0., 0., 1., 1., 0., 0., 1., 1., 1., 0.,
    ];
    assert_eq!(out["y"].data, [strict, strict].concat());
    assert_round_trip(&g, &[("x", x.clone())]);
    let mut folded = g.clone();
    dorac::passes::fold_constants(&mut folded, &HashSet::new()).unwrap();
    let mut ops = ops_in_order(&folded);
    ops.sort();
    assert_eq!(ops, ["add", "const", "input"]);
    assert_eq!(eval(&folded, &[("x", x.clone())]), out);
}

#[test]
fn split_by_sizes_and_by_num_outputs() {
    // opset 13: sizes as an input; opset 18: num_outputs (uneven: 3, 3, 1), unused output.
    let m13 = model(
        vec![
            with_attr(
                node("Split", "split", &["x", "sizes"], &["a", "b"]),
                attr_i("axis", 1),
            ),
            node("Sub", "sub", &["a", "b2"], &["y"]),
            node("Relu", "r", &["b"], &["z"]),
        ],
        vec![i64_init("sizes", &[2, 4]), f32_init("b2", &[1], &[1.0])],
        vec![vi("x", &[Ok(3), Ok(6)])],
        vec![vi("y", &[Ok(3), Ok(2)]), vi("z", &[Ok(3), Ok(4)])],
        13,
    );
    let g = import_ok(&m13);
    let a = g.find_by_name("a").unwrap();
    assert_eq!(
        g.node(a).op,
        Op::Slice {
            starts: vec![0, 0],
            ends: vec![3, 2],
            steps: vec![1, 1]
        }
    );
    let b = g.find_by_name("b").unwrap();
    assert_eq!(g.shape(b), &[3, 4]);
    let x: Vec<f64> = (0..18).map(f64::from).collect();
    let out = eval(&g, &[("x", x.clone())]);
    assert_eq!(out["y"].data, vec![-1., 0., 5., 6., 11., 12.]);
    assert_eq!(out["z"].data[..4], [2., 3., 4., 5.]);
    assert_round_trip(&g, &[("x", x)]);

    let split18 = with_attr(
        node("Split", "split", &["x"], &["p", "", "r"]),
        attr_i("num_outputs", 3),
    );
    let m18 = model(
        vec![split18, node("Neg", "n", &["p"], &["y"])],
        vec![],
        vec![vi("x", &[Ok(7), Ok(2)])],
        vec![vi("y", &[Ok(3), Ok(2)]), vi("r", &[Ok(1), Ok(2)])],
        18,
    );
    let g = import_ok(&m18);
    assert_eq!(g.shape(g.outputs()[0].1), &[3, 2]);
    let r = g.outputs()[1].1;
    assert_eq!(
        g.node(r).op,
        Op::Slice {
            starts: vec![6, 0],
            ends: vec![7, 2],
            steps: vec![1, 1]
        }
    );
    let x: Vec<f64> = (0..14).map(f64::from).collect();
    assert_eq!(eval(&g, &[("x", x.clone())])["r"].data, vec![12., 13.]);
    assert_round_trip(&g, &[("x", x)]);

    // Extra outputs of other ops are still refused when used.
    let e = import_err(&model(
        vec![
            node("Relu", "r", &["x"], &["y", "extra"]),
            node("Neg", "n", &["extra"], &["z"]),
        ],
        vec![],
        vec![vi("x", &[Ok(2)])],
        vec![vi("z", &[Ok(2)])],
        18,
    ));
    assert!(
        e.to_string().contains("Relu with its extra outputs used"),
        "{e}"
    );
}

#[test]
fn slice_with_negative_bounds_clamping_and_steps() {
    let m = model(
        vec![
            node(
                "Slice",
                "s",
                &["x", "starts", "ends", "axes", "steps"],
                &["y"],
            ),
            node("Slice", "t", &["x", "starts2", "ends2"], &["z"]),
        ],
        vec![
            i64_init("starts", &[-1, 1]),
            i64_init("ends", &[-100, i64::MAX]),
            i64_init("axes", &[0, -1]),
            i64_init("steps", &[-2, 3]),
            i64_init("starts2", &[1]),
            i64_init("ends2", &[-1]),
        ],
        vec![vi("x", &[Ok(5), Ok(8)])],
        vec![vi("y", &[Ok(3), Ok(3)]), vi("z", &[Ok(3), Ok(8)])],
        13,
    );
    let g = import_ok(&m);
    let y = g.outputs()[0].1;
    // Rows 4, 2, 0; columns 1, 4, 7; the end is exact (start + len * step).
    assert_eq!(
        g.node(y).op,
        Op::Slice {
            starts: vec![4, 1],
            ends: vec![-2, 10],
            steps: vec![-2, 3]
        }
    );
    let x: Vec<f64> = (0..40).map(f64::from).collect();
    let out = eval(&g, &[("x", x.clone())]);
    assert_eq!(
        out["y"].data,
        vec![33., 36., 39., 17., 20., 23., 1., 4., 7.]
    );
    assert_eq!(out["z"].data[0], 8.0);
    assert_eq!(g.shape(g.outputs()[1].1), &[3, 8]);
    assert_round_trip(&g, &[("x", x)]);
    // A window that runs down past element 0 exports as ONNX's -dim - 1 and comes back.
    let m = model(
        vec![node("Slice", "s", &["x", "st", "en", "ax", "sp"], &["y"])],
        vec![
            i64_init("st", &[2]),
            i64_init("en", &[i64::MIN]),
            i64_init("ax", &[1]),
            i64_init("sp", &[-1]),
        ],
        vec![vi("x", &[Ok(2), Ok(3)])],
        vec![vi("y", &[Ok(2), Ok(3)])],
        13,
    );
    let g = import_ok(&m);
    let x = vec![1., 2., 3., 4., 5., 6.];
    assert_eq!(
        eval(&g, &[("x", x.clone())])["y"].data,
        vec![3., 2., 1., 6., 5., 4.]
    );
    assert_round_trip(&g, &[("x", x)]);
}

#[test]
fn reduce_mean_axes_by_opset() {
    let mk = |opset: i64| {
        let (n, inits) = if opset >= 18 {
            (
                node("ReduceMean", "m", &["x", "axes"], &["y"]),
                vec![i64_init("axes", &[-1, 0])],
            )
        } else {
            (
                with_attr(
                    node("ReduceMean", "m", &["x"], &["y"]),
                    attr_ints("axes", &[-1, 0]),
                ),
                vec![],
            )
        };
        model(
            vec![with_attr(n, attr_i("keepdims", 0))],
            inits,
            vec![vi("x", &[Ok(2), Ok(3), Ok(4)])],
            vec![vi("y", &[Ok(3)])],
            opset,
        )
    };
    let x: Vec<f64> = (0..24).map(f64::from).collect();
    for opset in [13, 17, 18] {
        let g = import_ok(&mk(opset));
        let mut ops = ops_in_order(&g);
        ops.sort();
        assert_eq!(ops, ["const", "div", "input", "reduce_sum"], "{g}");
        let sum = g.inputs_of(g.outputs()[0].1)[0];
        assert_eq!(
            g.node(sum).op,
            Op::Reduce {
                kind: Reduce::Sum,
                axes: vec![0, 2],
                keepdims: false
            }
        );
        // Means of {0..3, 12..15}, {4..7, 16..19}, {8..11, 20..23}.
        assert_eq!(
            eval(&g, &[("x", x.clone())])["y"].data,
            vec![7.5, 11.5, 15.5]
        );
        assert_round_trip(&g, &[("x", x.clone())]);
    }
    // From 18, an axes attribute where the input should be is still accepted.
    let g = import_ok(&model(
        vec![with_attr(
            node("ReduceMean", "m", &["x"], &["y"]),
            attr_ints("axes", &[1]),
        )],
        vec![],
        vec![vi("x", &[Ok(2), Ok(3), Ok(4)])],
        vec![vi("y", &[Ok(2), Ok(1), Ok(4)])],
        18,
    ));
    assert_eq!(g.shape(g.outputs()[0].1), &[2, 1, 4]);
}

#[test]
fn casts_comparisons_and_variadic_min_max() {
    let cast = |to: DataType, out: &str| {
        with_attr(node("Cast", out, &["x"], &[out]), attr_i("to", to as i64))
    };
    let m = model(
        vec![
            cast(DataType::Int64, "i"),
            cast(DataType::Int32, "i32"),
            cast(DataType::Bool, "b"),
            cast(DataType::Double, "d"),
            cast(DataType::Float, "f"),
            node("Greater", "gt", &["x", "w"], &["gt"]),
            node("GreaterOrEqual", "ge", &["i", "zero"], &["ge"]),
            node("Less", "lt", &["x", "w"], &["lt"]),
            node("IsNaN", "nan", &["x"], &["nan"]),
            node("Max", "max", &["x", "w", "half"], &["max"]),
            node("Min", "min", &["x", "w"], &["min"]),
            node("Clip", "clip", &["x", "lo", "hi"], &["clip"]),
            node("Clip", "clip_lo", &["x", "lo"], &["clip_lo"]),
            node("Div", "idiv", &["i", "two"], &["q"]),
        ],
        vec![
            f32_init("w", &[4], &[0.0, 1.0, -1.0, 2.0]),
            f32_init("half", &[], &[0.5]),
            f32_init("lo", &[], &[-1.0]),
            f32_init("hi", &[], &[1.0]),
            i64_tensor("zero", &[], &[0]),
            i64_tensor("two", &[], &[2]),
        ],
        vec![vi("x", &[Ok(2), Ok(4)])],
        [
            "i", "i32", "b", "d", "f", "gt", "ge", "lt", "nan", "max", "min", "clip", "clip_lo",
            "q",
        ]
        .iter()
        .map(|n| vi(n, &[Ok(2), Ok(4)]))
        .collect(),
        17,
    );
    let g = import_ok(&m);
    let node_of = |name: &str| g.node(g.find_by_name(name).unwrap());
    assert_eq!(node_of("i").op, Op::Cast { to: DType::I64 });
    assert_eq!(node_of("i32").dtype, DType::I64);
    assert_eq!(node_of("b").dtype, DType::Bool);
    // Float to float: nothing to do.
    assert_eq!(node_of("d").op, Op::Identity);
    assert_eq!(node_of("f").op, Op::Identity);
    // Greater is Less with the operands swapped.
    let gt = g.find_by_name("gt").unwrap();
    assert_eq!(g.node(gt).op, Op::Binary(Binary::Less));
    assert_eq!(g.node(g.inputs_of(gt)[0]).name, "w");
    assert_eq!(node_of("max").op, Op::Binary(Binary::Max));
    let x = vec![-2.5, 0.0, 3.7, f64::NAN, 1.5, -0.5, -7.9, 2.0];
    let out = eval(&g, &[("x", x.clone())]);
    assert_eq!(out["i"].data[..3], [-2.0, 0.0, 3.0]);
    assert_eq!(out["b"].data, vec![1., 0., 1., 1., 1., 1., 1., 1.]);
    assert_eq!(out["gt"].data, vec![0., 0., 1., 0., 1., 0., 0., 0.]);
    assert_eq!(out["ge"].data[..3], [0., 1., 1.]);
    assert_eq!(out["nan"].data, vec![0., 0., 0., 1., 0., 0., 0., 0.]);
    assert_eq!(out["max"].data[..3], [0.5, 1.0, 3.7]);
    assert!(out["max"].data[3].is_nan());
    assert_eq!(out["min"].data[..3], [-2.5, 0.0, -1.0]);
    assert_eq!(out["clip"].data[..3], [-1.0, 0.0, 1.0]);
    assert_eq!(out["clip_lo"].data[..3], [-1.0, 0.0, 3.7]);
    // Integer division truncates toward zero: -2 / 2, 0 / 2, 3 / 2, ..., -7 / 2.
    assert_eq!(node_of("q").op, Op::Binary(Binary::Div));
    assert_eq!(node_of("q").dtype, DType::I64);
    assert_eq!(out["q"].data[..3], [-1.0, 0.0, 1.0]);
    assert_eq!(out["q"].data[6], -3.0);
    let back = round_trip(&g);
    assert_eq!(format!("{g}"), format!("{back}"));
}

#[test]
fn gathers_unsqueeze_squeeze_and_trilu() {
    let nd_idx = i64_tensor("nd", &[2, 2], &[1, -1, 0, 2]);
    let el_idx = i64_tensor("el", &[2, 2], &[2, 0, -1, 1]);
    let squeeze_old = with_attr(
        node("Squeeze", "sq_old", &["x4"], &["sq_old"]),
        attr_ints("axes", &[0, 2]),
    );
    let unsqueeze_old = with_attr(
        node("Unsqueeze", "unsq_old", &["x"], &["u_old"]),
        attr_ints("axes", &[0, -1]),
    );
    let build = |opset: i64| {
        let (sq, unsq) = if opset >= 13 {
            (
                node("Squeeze", "sq", &["x4", "sq_axes"], &["sq"]),
                node("Unsqueeze", "unsq", &["x", "unsq_axes"], &["u"]),
            )
        } else {
            (
                {
                    let mut n = squeeze_old.clone();
                    n.output = vec!["sq".into()];
                    n
                },
                {
                    let mut n = unsqueeze_old.clone();
                    n.output = vec!["u".into()];
                    n
                },
            )
        };
        model(
            vec![
                constant("nd", nd_idx.clone()),
                constant("el", el_idx.clone()),
                node("GatherND", "gnd", &["x", "nd"], &["gnd"]),
                with_attr(
                    node("GatherElements", "gel", &["x", "el"], &["gel"]),
                    attr_i("axis", 1),
                ),
                with_attr(
                    node("Gather", "gcol", &["x", "col"], &["gcol"]),
                    attr_i("axis", 1),
                ),
                with_attr(
                    node("Trilu", "triu", &["x", "k"], &["triu"]),
                    attr_i("upper", 1),
                ),
                sq,
                unsq,
                node("Squeeze", "sq_all", &["x4"], &["sq_all"]),
            ],
            vec![
                i64_tensor("col", &[], &[-1]),
                i64_tensor("k", &[], &[1]),
                i64_init("sq_axes", &[0, -2]),
                i64_init("unsq_axes", &[0, -1]),
            ],
            vec![
                vi("x", &[Ok(2), Ok(3)]),
                vi("x4", &[Ok(1), Ok(2), Ok(1), Ok(3)]),
            ],
            vec![
                vi("gnd", &[Ok(2)]),
                vi("gel", &[Ok(2), Ok(2)]),
                vi("gcol", &[Ok(2)]),
                vi("triu", &[Ok(2), Ok(3)]),
                vi("sq", &[Ok(2), Ok(3)]),
                vi("u", &[Ok(1), Ok(2), Ok(3), Ok(1)]),
                vi("sq_all", &[Ok(2), Ok(3)]),
            ],
            opset,
        )
    };
    let x = vec![1., 2., 3., 4., 5., 6.];
    let x4: Vec<f64> = (10..16).map(f64::from).collect();
    let feeds = [("x", x), ("x4", x4)];
    for opset in [11, 13, 18] {
        let g = import_ok(&build(opset));
        let out = eval(&g, &feeds);
        assert_eq!(out["gnd"].data, vec![6., 3.], "opset {opset}");
        assert_eq!(out["gel"].data, vec![3., 1., 6., 5.]);
        assert_eq!(out["gcol"].data, vec![3., 6.]);
        assert_eq!(out["triu"].data, vec![0., 2., 3., 0., 0., 6.]);
        assert_eq!(out["sq"].shape, vec![2, 3]);
        assert_eq!(out["u"].shape, vec![1, 2, 3, 1]);
        assert_eq!(out["sq_all"].shape, vec![2, 3]);
        assert_round_trip(&g, &feeds);
        // Trilu needs opset 14 in the exported model.
        assert!(export(&g).unwrap().opset_import[0].version() >= 14);
    }
}

#[test]
fn computed_and_runtime_shape_inputs() {
    // A shape computed from a float constant through Cast folds; one computed from a graph
    // input is refused, naming the node.
    let m = model(
        vec![
            node("Sqrt", "sqrt", &["four"], &["two_f"]),
            with_attr(node("Cast", "cast", &["two_f"], &["two"]), attr_i("to", 7)),
            node("ConstantOfShape", "zeros", &["two"], &["z"]),
            node("Add", "add", &["x", "z"], &["y"]),
        ],
        vec![f32_init("four", &[1], &[4.0])],
        vec![vi("x", &[Ok(2)])],
        vec![vi("y", &[Ok(2)])],
        17,
    );
    let g = import_ok(&m);
    assert_eq!(g.shape(g.outputs()[0].1), &[2]);
    let m = model(
        vec![
            with_attr(node("Cast", "cast", &["n"], &["ni"]), attr_i("to", 7)),
            node("Range", "range", &["zero", "ni", "one"], &["r"]),
        ],
        vec![i64_tensor("zero", &[], &[0]), i64_tensor("one", &[], &[1])],
        vec![vi("n", &[])],
        vec![vi_typed("r", &[Err("n")], DataType::Int64)],
        17,
    );
    let e = import_err(&m);
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
    assert!(
        e.to_string().contains("Range") && e.to_string().contains("range"),
        "{e}"
    );
}

#[test]
fn bool_and_narrow_integer_initializers() {
    let m = model(
        vec![
            node("And", "and", &["p", "mask"], &["y"]),
            with_attr(node("Cast", "c", &["small"], &["f"]), attr_i("to", 1)),
            node("Mul", "mul", &["x", "f"], &["z"]),
        ],
        vec![
            typed_tensor("mask", &[3], DataType::Bool, vec![1, 0, 1]),
            typed_tensor("small", &[3], DataType::Int8, vec![0xff, 2, 3]),
        ],
        vec![vi_typed("p", &[Ok(3)], DataType::Bool), vi("x", &[Ok(3)])],
        vec![vi_typed("y", &[Ok(3)], DataType::Bool), vi("z", &[Ok(3)])],
        17,
    );
    let g = import_ok(&m);
    let mask = g.find_by_name("mask").unwrap();
    assert_eq!(
        g.const_tensor(mask).unwrap(),
        &Tensor::bool(vec![3], vec![true, false, true])
    );
    let small = g.find_by_name("small").unwrap();
    assert_eq!(
        g.const_tensor(small).unwrap(),
        &Tensor::i64(vec![3], vec![-1, 2, 3])
    );
    let feeds = [("p", vec![1.0, 1.0, 0.0]), ("x", vec![1.0, 1.0, 1.0])];
    let out = eval(&g, &feeds);
    assert_eq!(out["y"].data, vec![1.0, 0.0, 0.0]);
    assert_eq!(out["z"].data, vec![-1.0, 2.0, 3.0]);
    assert_round_trip(&g, &feeds);
}

#[test]
fn long_concat_becomes_a_tree_of_bindable_concats() {
    // 16 runtime inputs: one kernel binds at most 7, so the importer nests them.
    let names: Vec<String> = (0..16).map(|i| format!("x{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let m = model(
        vec![with_attr(
            node("Concat", "cat", &refs, &["y"]),
            attr_i("axis", -1),
        )],
        vec![],
        names.iter().map(|n| vi(n, &[Ok(2), Ok(1)])).collect(),
        vec![vi("y", &[Ok(2), Ok(16)])],
        17,
    );
    let g = import_ok(&m);
    let concats: Vec<usize> = g
        .petgraph()
        .node_indices()
        .filter(|&n| matches!(g.node(n).op, Op::Concat { .. }))
        .map(|n| g.inputs_of(n).len())
        .collect();
    assert!(concats.iter().all(|&k| k <= 7), "{concats:?}");
    assert_eq!(concats.len(), 4, "{g}");
    let feeds: Vec<(&str, Vec<f64>)> = refs
        .iter()
        .enumerate()
        .map(|(i, n)| (*n, vec![i as f64, -(i as f64)]))
        .collect();
    let out = eval(&g, &feeds);
    let want: Vec<f64> = (0..16)
        .map(f64::from)
        .chain((0..16).map(|i| -f64::from(i)))
        .collect();
    assert_eq!(out["y"].data, want);
    assert_round_trip(&g, &feeds);
}

/// The IR ops the conformance work added (Mod and Fmod, ReduceMax, ReduceMin, ReduceProd)
/// export as their ONNX ops and import back as the same IR, at opsets before and after the
/// reductions' axes became an input (18).
#[test]
fn new_ops_round_trip() {
    for opset in [17, 18] {
        let mut g = GraphBuilder::new();
        g.info_mut().opset = opset;
        let a = g.add_input("a", vec![3, 4]);
        let b = g.add_input("b", vec![4]);
        for (op, name) in [(Binary::Mod, "mod"), (Binary::Fmod, "fmod")] {
            let y = g.add(Op::Binary(op), &[a, b], name, name).unwrap();
            g.add_output(name, y);
        }
        for (kind, name) in [
            (Reduce::Max, "max"),
            (Reduce::Min, "min"),
            (Reduce::Prod, "prod"),
        ] {
            let op = Op::Reduce {
                kind,
                axes: vec![1],
                keepdims: false,
            };
            let y = g.add(op, &[a], name, name).unwrap();
            g.add_output(name, y);
        }
        let g = g.finish();
        let back = round_trip(&g);
        assert_eq!(format!("{g}"), format!("{back}"), "opset {opset}");
    }
}

/// A model read with external data is written with external data: the large initializers go to
/// `<out>.data` at page-aligned offsets (small ones stay inline), the data streams from the
/// input's mapped file, the result reads back bit for bit, and no temporary file is left.
#[test]
fn external_data_round_trips() {
    let dir = TempDir::new("external_out");
    // w: 16 x 32 floats (2 KiB, over the 1 KiB threshold), after 8 bytes of padding; b: 4 floats.
    let w: Vec<f32> = (0..512).map(|i| i as f32 * 0.25 - 7.0).collect();
    let mut bytes = vec![0u8; 8];
    bytes.extend(w.iter().flat_map(|x| x.to_le_bytes()));
    std::fs::write(dir.path().join("in.onnx.data"), &bytes).unwrap();
    let mut m = model(
        vec![
            node("MatMul", "mm", &["x", "w"], &["h"]),
            node("Add", "add", &["h", "b"], &["y"]),
        ],
        vec![external("w", "in.onnx.data", 8, &[16, 32])],
        vec![vi("x", &[Ok(2), Ok(16)])],
        vec![vi("y", &[Ok(2), Ok(32)])],
        17,
    );
    let b = Tensor::f32(vec![32], (0..32).map(|i| i as f32).collect());
    let g = m.graph.as_mut().unwrap();
    g.initializer.push(dorac::onnx::proto::TensorProto {
        name: Some("b".into()),
        dims: vec![32],
        data_type: Some(1),
        float_data: b.as_f32().unwrap().to_vec(),
        ..Default::default()
    });
    let input = dir.path().join("in.onnx");
    save_model(&m, &input).unwrap();
    let graph = import(
        &load_model(&input).unwrap(),
        dir.path(),
        &no_pins(),
        &no_shapes(),
    )
    .unwrap();
    assert!(graph.info.external_data);

    let out = dir.path().join("out.onnx");
    dorac::onnx::save_graph(&graph, &out).unwrap();
    let written = load_model(&out).unwrap();
    let inits = &written.graph.as_ref().unwrap().initializer;
    let entry = |t: &dorac::onnx::proto::TensorProto, key: &str| {
        t.external_data
            .iter()
            .find(|e| e.key() == key)
            .map(|e| e.value().to_string())
    };
    let wp = inits.iter().find(|t| t.name() == "w").unwrap();
    assert_eq!(entry(wp, "location").as_deref(), Some("out.onnx.data"));
    assert_eq!(entry(wp, "offset").as_deref(), Some("0"));
    assert_eq!(entry(wp, "length").as_deref(), Some("2048"));
    let bp = inits.iter().find(|t| t.name() == "b").unwrap();
    assert!(
        bp.external_data.is_empty() && bp.raw_data.is_some(),
        "small tensors stay inline"
    );

    let again = import(&written, dir.path(), &no_pins(), &no_shapes()).unwrap();
    let value = |g: &Graph, name: &str| {
        let n = g.find_by_name(name).unwrap();
        g.const_tensor(n).unwrap().as_f32().unwrap().to_vec()
    };
    assert_eq!(value(&again, "w"), w);
    assert_eq!(value(&again, "b"), b.as_f32().unwrap());
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["in.onnx", "in.onnx.data", "out.onnx", "out.onnx.data"]
    );

    // A model without external data is still written as one file.
    let mut inline = again.clone();
    inline.info.external_data = false;
    let single = dir.path().join("single.onnx");
    dorac::onnx::save_graph(&inline, &single).unwrap();
    assert!(!dir.path().join("single.onnx.data").exists());
    let reread = import(
        &load_model(&single).unwrap(),
        dir.path(),
        &no_pins(),
        &no_shapes(),
    )
    .unwrap();
    assert_eq!(value(&reread, "w"), w);
}

// ---- sizes a model can ask for: refused with a clear error, before anything is allocated ----

/// Every one of these used to panic, abort on allocation or wrap around.
#[test]
fn oversized_shapes_are_refused_by_name() {
    let huge_reshape = model(
        vec![node("Reshape", "r", &["x", "shape"], &["y"])],
        vec![i64_init("shape", &[3, 16, (1i64 << 62) + 1])],
        vec![vi("x", &[Ok(48)])],
        vec![vi("y", &[Ok(3), Ok(16), Err("n")])],
        17,
    );
    let constant_of_shape = |dims: &[i64]| {
        model(
            vec![node("ConstantOfShape", "c", &["shape"], &["y"])],
            vec![i64_init("shape", dims)],
            vec![],
            vec![vi("y", &[Err("a"), Err("b")])],
            17,
        )
    };
    let range = model(
        vec![node("Range", "rng", &["s", "l", "d"], &["y"])],
        vec![
            f32_init("s", &[], &[0.0]),
            f32_init("l", &[], &[1e11]),
            f32_init("d", &[], &[1.0]),
        ],
        vec![],
        vec![vi("y", &[Err("n")])],
        17,
    );
    let expand = model(
        vec![node("Expand", "e", &["x", "shape"], &["y"])],
        vec![i64_init("shape", &[200_000, 100_000])],
        vec![vi("x", &[Ok(1)])],
        vec![vi("y", &[Err("a"), Err("b")])],
        17,
    );
    for (what, m, needle) in [
        ("reshape", huge_reshape, "node"),
        (
            "constant_of_shape",
            constant_of_shape(&[100_000, 100_000]),
            "ConstantOfShape node",
        ),
        (
            "constant_of_shape 2^62",
            constant_of_shape(&[1 << 62, 4]),
            "ConstantOfShape node",
        ),
        ("range", range, "Range node"),
        ("expand", expand, "node 'e'"),
    ] {
        let err = import_err(&m).to_string();
        assert!(
            err.contains(needle)
                && (err.contains("memory budget") || err.contains("cannot reshape")),
            "{what}: {err}"
        );
    }
}

/// ONNX requires one element type for a product's or an arithmetic op's inputs; declared output
/// shapes are checked; opsets outside the tested range are warned about.
#[test]
fn types_declared_shapes_and_opsets_are_checked() {
    let mm = |w: TensorProto, out: &[Result<i64, &str>], opset: i64| {
        model(
            vec![node("MatMul", "mm", &["x", "w"], &["y"])],
            vec![w],
            vec![vi("x", &[Ok(2), Ok(3)])],
            vec![vi("y", out)],
            opset,
        )
    };
    let w = || f32_init("w", &[3, 4], &[0.5; 12]);
    let int_w = TensorProto {
        name: Some("w".into()),
        dims: vec![3, 4],
        data_type: Some(DataType::Int64 as i32),
        int64_data: vec![1; 12],
        ..Default::default()
    };
    let e = import_err(&mm(int_w, &[Ok(2), Ok(4)], 17)).to_string();
    assert!(e.contains("node 'mm'") && e.contains("int64"), "{e}");
    // A float16 weight against a float32 input: both compute in f32 inside dorac, but the
    // model is invalid ONNX and is refused as such.
    let half_w = TensorProto {
        name: Some("w".into()),
        dims: vec![3, 4],
        data_type: Some(DataType::Float16 as i32),
        int32_data: vec![half::f16::from_f32(0.5).to_bits() as i32; 12],
        ..Default::default()
    };
    let e = import_err(&mm(half_w, &[Ok(2), Ok(4)], 17)).to_string();
    assert!(
        e.contains("node 'mm'") && e.contains("float32 and float16"),
        "{e}"
    );
    let e = import_err(&mm(w(), &[Ok(2), Ok(9)], 17)).to_string();
    assert!(
        e.contains("graph output 'y'") && e.contains("declares shape [2, 9]") && e.contains("2x4"),
        "{e}"
    );
    let ok = |m: &ModelProto| import(m, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    assert!(ok(&mm(w(), &[Ok(2), Err("n")], 17))
        .info
        .warnings
        .is_empty());
    for opset in [1, 99] {
        let g = ok(&mm(w(), &[Ok(2), Ok(4)], opset));
        assert!(
            g.info
                .warnings
                .iter()
                .any(|w| w.contains(&format!("opset {opset}"))),
            "opset {opset}: {:?}",
            g.info.warnings
        );
    }
}

/// Inline float32 initializers stay slices of the mapped file after import (`F32Buf::Raw`, read
/// as values only on demand), read back as the values the file holds, and export writes the
/// very bytes it read.
#[test]
fn inline_weights_stay_raw_bytes_of_the_file() {
    let path = model_path("mlp3d");
    let model = load_model(&path).unwrap();
    let g = import(&model, path.parent().unwrap(), &no_pins(), &no_shapes()).unwrap();
    // The bytes of the initializers and of Constant nodes' tensors (the importer may rename
    // weights after their modules).
    let graph = model.graph.as_ref().unwrap();
    let constants = (graph.node.iter())
        .flat_map(|n| &n.attribute)
        .filter_map(|a| a.t.as_ref());
    let file: Vec<&[u8]> = (graph.initializer.iter().chain(constants))
        .filter_map(|t| t.raw_data.as_deref())
        .collect();
    let mut raw = HashMap::new();
    for node in g.petgraph().node_weights() {
        let Op::Const(t) = &node.op else { continue };
        let dorac::tensor::Data::F32(buf @ dorac::tensor::F32Buf::Raw(r)) = &t.data else {
            continue;
        };
        assert!(
            file.contains(&&r.bytes[..]),
            "{}: not the file's bytes",
            node.name
        );
        let values: Vec<f32> = (r.bytes.chunks_exact(4))
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(&buf[..], &values[..], "{}", node.name);
        raw.insert(node.name.clone(), r.bytes.clone());
    }
    assert!(
        raw.len() >= 8,
        "only {} weights kept as raw bytes",
        raw.len()
    );
    let out = export(&g).unwrap();
    let mut written = 0;
    for t in &out.graph.as_ref().unwrap().initializer {
        if let Some(bytes) = raw.get(t.name.as_deref().unwrap()) {
            assert_eq!(t.raw_data.as_deref(), Some(&bytes[..]), "{:?}", t.name);
            written += 1;
        }
    }
    assert_eq!(written, raw.len(), "every raw weight is exported");
}

/// Resize's inputs and attributes that make no resize are refused with the node named: both
/// scales and sizes, neither, scales of the wrong count, a mode ONNX does not define, linear
/// interpolation of integers.
#[test]
fn malformed_resizes_are_refused_with_the_node_named() {
    let resize = |inputs: &[&str], attrs: Vec<AttributeProto>, elem: DataType| {
        let mut n = node("Resize", "/up/Resize", inputs, &["y"]);
        n.attribute = attrs;
        model(
            vec![n],
            vec![
                f32_init("scales", &[4], &[1.0, 1.0, 2.0, 2.0]),
                f32_init("scales3", &[3], &[1.0, 2.0, 2.0]),
                i64_init("sizes", &[1, 1, 4, 4]),
            ],
            vec![vi_typed("x", &[Ok(1), Ok(1), Ok(2), Ok(2)], elem)],
            vec![vi("y", &[Ok(1), Ok(1), Ok(4), Ok(4)])],
            19,
        )
    };
    let mode = |m: &str| AttributeProto {
        name: Some("mode".into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(m.as_bytes().to_vec()),
        ..Default::default()
    };
    let cases = [
        (
            resize(&["x", "", "scales", "sizes"], vec![], DataType::Float),
            "both scales and sizes",
        ),
        (
            resize(&["x"], vec![], DataType::Float),
            "neither scales nor sizes",
        ),
        (
            resize(&["x", "", "scales3"], vec![], DataType::Float),
            "scales has 3 values, expected 4",
        ),
        (
            resize(
                &["x", "", "scales"],
                vec![mode("bilinear")],
                DataType::Float,
            ),
            "mode 'bilinear'",
        ),
        (
            resize(&["x", "", "scales"], vec![mode("linear")], DataType::Int64),
            "only mode 'nearest' resizes a non-float tensor",
        ),
    ];
    for (m, want) in cases {
        let e = import_err(&m).to_string();
        assert!(e.contains("/up/Resize") && e.contains(want), "{want}: {e}");
    }
    // The same model with one of them imports: a nearest resize of integers.
    let ok = resize(&["x", "", "scales"], vec![], DataType::Int64);
    import(&ok, Path::new("."), &no_pins(), &no_shapes()).unwrap();
}

/// Pad and Conv are lowered to Gathers whose ids for the padding fall outside the data (the IR
/// gathers 0 there); ONNX requires ids inside it. The export pads the data with a zero slot and
/// points those ids at it, so the written model is valid, and it computes the same values.
#[test]
fn gathers_of_padding_export_with_ids_inside_the_data() {
    let m = model(
        vec![node("Pad", "/p/Pad", &["x", "pads"], &["y"])],
        vec![i64_init("pads", &[1, 0, 0, 2])],
        vec![vi("x", &[Ok(2), Ok(3)])],
        vec![vi("y", &[Ok(3), Ok(5)])],
        17,
    );
    let g = import(&m, Path::new("."), &no_pins(), &no_shapes()).unwrap();
    let exported = export(&g).unwrap();
    let gp = exported.graph.as_ref().unwrap();
    let gathers: Vec<&NodeProto> = gp.node.iter().filter(|n| n.op_type() == "Gather").collect();
    assert_eq!(gathers.len(), 2, "one per padded axis");
    for gather in gathers {
        // Its data is a Pad of one zero slot; its ids lie inside the padded axis.
        let pad = gp.node.iter().find(|n| n.output[0] == gather.input[0]);
        assert_eq!(pad.map(|p| p.op_type()), Some("Pad"), "{gather:?}");
        let ids = gp
            .initializer
            .iter()
            .find(|t| t.name() == gather.input[1])
            .unwrap();
        let ids: Vec<i64> = (ids.raw_data().chunks(8))
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .chain(ids.int64_data.iter().copied())
            .collect();
        let len = [2, 3][usize::try_from(gather.attribute[0].i()).unwrap()];
        assert!(ids.iter().all(|&i| (0..=len).contains(&i)), "{ids:?}");
        assert!(
            ids.contains(&len),
            "the padding reads the zero slot: {ids:?}"
        );
    }
    // The lowering's own ids, replaced, are not written: every initializer has a reader.
    for t in &gp.initializer {
        assert!(
            gp.node
                .iter()
                .any(|n| n.input.contains(&t.name().to_string())),
            "initializer '{}' is read by no node",
            t.name()
        );
    }
    let back = round_trip(&g);
    let x: HashMap<String, Array> = [(
        "x".to_string(),
        Array::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
    )]
    .into();
    let want = dorac::reference::run(&g, &x).unwrap();
    let got = dorac::reference::run(&back, &x).unwrap();
    assert_eq!(got["y"].data, want["y"].data);
    let padded = [0., 0., 0., 0., 0., 1., 2., 3., 0., 0., 4., 5., 6., 0., 0.];
    assert_eq!(want["y"].data, padded);
}

/// Found by fuzzing: an Attention whose K has another rank than Q indexed past K's shape (a
/// panic); Q, K and V of mixed ranks, and a past key of rank 3, are refused by name.
#[test]
fn attention_of_mixed_ranks_is_refused() {
    let attention = |k: &[Result<i64, &str>], past: bool| {
        let mut inputs = vec!["q", "k", "v"];
        if past {
            inputs.extend(["", "past_k", "past_v"]);
        }
        let n = with_attr(
            with_attr(
                node("Attention", "/attn/Attention", &inputs, &["y"]),
                attr_i("q_num_heads", 2),
            ),
            attr_i("kv_num_heads", 2),
        );
        let mut ins = vec![
            vi("q", &[Ok(1), Ok(2), Ok(8)]),
            vi("k", k),
            vi("v", &[Ok(1), Ok(2), Ok(8)]),
        ];
        if past {
            ins.push(vi("past_k", &[Ok(1), Ok(2), Ok(4)]));
            ins.push(vi("past_v", &[Ok(1), Ok(2), Ok(4)]));
        }
        model(
            vec![n],
            vec![],
            ins,
            vec![vi("y", &[Ok(1), Ok(2), Ok(8)])],
            23,
        )
    };
    let e = import_err(&attention(&[Ok(2), Ok(8)], false)).to_string();
    assert!(
        e.contains("/attn/Attention") && e.contains("ranks [3, 2, 3]"),
        "{e}"
    );
    let e = import_err(&attention(&[Ok(1), Ok(2), Ok(8)], true)).to_string();
    assert!(e.contains("a past key or value has shape 1x2x4"), "{e}");
}

/// Found by fuzzing: an Einsum term with an ellipsis and more labels than its operand's rank
/// overflowed the ellipsis width (a capacity-overflow panic); it is refused by name, as are
/// labels that are not ASCII beside an ellipsis.
#[test]
fn einsum_terms_longer_than_their_operand_are_refused() {
    for eq in ["abcde...->a", "éé...->", "...ab->ab"] {
        let n = node("Einsum", "/e/Einsum", &["x"], &["y"]);
        let n = with_attr(n, attr_s("equation", eq));
        let (x, y) = (vi("x", &[Ok(2)]), vi("y", &[Ok(2)]));
        let m = model(vec![n], vec![], vec![x], vec![y], 17);
        let e = import_err(&m).to_string();
        assert!(
            e.contains("/e/Einsum") && e.contains("does not fit"),
            "{eq}: {e}"
        );
    }
}

/// Found by fuzzing: a GRU whose X had 2 dims indexed past its shape (a bounds panic); X, the
/// weights and the states are checked against the shapes the op defines, naming the input.
#[test]
fn recurrent_weights_of_the_wrong_shape_are_refused() {
    let gru = |x: &[Result<i64, &str>], w: &[Result<i64, &str>]| {
        let n = with_attr(
            node("GRU", "/rnn/GRU", &["x", "w", "r"], &["y"]),
            attr_i("hidden_size", 4),
        );
        let ins = vec![vi("x", x), vi("w", w), vi("r", &[Ok(1), Ok(12), Ok(4)])];
        model(
            vec![n],
            vec![],
            ins,
            vec![vi("y", &[Ok(5), Ok(1), Ok(2), Ok(4)])],
            17,
        )
    };
    let e = import_err(&gru(&[Ok(5), Ok(3)], &[Ok(1), Ok(12), Ok(3)])).to_string();
    assert!(
        e.contains("/rnn/GRU") && e.contains("X has shape 5x3, expected 3 dims"),
        "{e}"
    );
    let e = import_err(&gru(&[Ok(5), Ok(2), Ok(3)], &[Ok(1), Ok(9), Ok(3)])).to_string();
    assert!(e.contains("W has shape 1x9x3, expected 1x12x3"), "{e}");
}
