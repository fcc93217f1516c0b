//! Quantized models (`models/quantized/`, made by `models/make_quantized.py`): weight-only, ONNX
//! Runtime's MatMulNBits with 4- and 8-bit codes, blocks of 16 and 32 (a block running past K),
//! symmetric, packed and float zero points, a bias input; and quantized dynamically
//! (DynamicQuantizeLinear, MatMulInteger). Each runs on the GPU and the reference executor
//! against onnxruntime's output, and the DoRA rewrite adapts the weight-only ones' layers.

mod common;

use common::*;
use dorac::onnx::proto::ModelProto;
use std::path::Path;

const VARIANTS: [&str; 5] = [
    "q4_sym16",
    "q4_asym32",
    "q8_asym16",
    "q4_float_zp_bias",
    "dynamic_u8",
];

fn model(variant: &str) -> std::path::PathBuf {
    models_dir()
        .join("quantized")
        .join(format!("{variant}.onnx"))
}

#[test]
fn quantized_models_match_onnxruntime() {
    let inputs = read("quantized", "inputs.safetensors");
    for v in VARIANTS {
        let g = load_path(&model(v), &inputs);
        let want = read("quantized", &format!("{v}.ort.safetensors"));
        let reference = run_reference(&g, &inputs);
        let gpu = run_gpu(&g, &inputs);
        let (r, d) = (rel(&reference, &want, "y"), rel(&gpu, &want, "y"));
        assert!(r < 1e-5 && d < 1e-5, "{v}: reference {r:.2e}, gpu {d:.2e}");
    }
}

/// `dorac rewrite` finds both dequantized layers, and the model it writes (plain MatMuls, DoRA
/// at PEFT's initialisation) still computes onnxruntime's output.
#[test]
fn quantized_layers_are_rewritten_into_dora() {
    let dir = temp_dir("quantized-rewrite");
    let out = dir.join("q4.dora.onnx");
    let rewrite = dorac_in(
        &dir,
        &[
            "rewrite",
            model("q4_asym32").to_str().unwrap(),
            "--shape",
            "batch=3",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let stdout = String::from_utf8_lossy(&rewrite.stdout);
    assert!(
        rewrite.status.success(),
        "{}",
        String::from_utf8_lossy(&rewrite.stderr)
    );
    // PEFT's module names of the exported nn.Sequential, with each layer's in and out.
    let rows: Vec<Vec<&str>> = stdout
        .lines()
        .map(|l| l.split_whitespace().take(3).collect())
        .collect();
    for layer in [["0", "48", "40"], ["2", "40", "24"]] {
        assert!(rows.iter().any(|r| *r == layer), "{layer:?}: {stdout}");
    }
    let inputs = read("quantized", "inputs.safetensors");
    let g = load_path(&out, &inputs);
    assert_eq!(g.adapters().len(), 2, "{stdout}");
    let want = read("quantized", "q4_asym32.ort.safetensors");
    let got = run_reference(&g, &inputs);
    assert!(rel(&got, &want, "y") < 1e-5);
}

/// A MatMulNBits whose attributes and tensors disagree is refused with the node named.
#[test]
fn malformed_matmul_nbits_is_refused_with_the_node_named() {
    let edit = |f: &dyn Fn(&mut ModelProto)| {
        let mut m = dorac::onnx::load_model(&model("q4_asym32")).unwrap();
        f(&mut m);
        let pins = dorac::onnx::ShapePins::parse(&["batch=3"]).unwrap();
        let e = dorac::onnx::import(&m, Path::new("."), &pins, &Default::default());
        match e {
            Ok(_) => panic!("imported"),
            Err(e) => e.to_string(),
        }
    };
    let set = |name: &'static str, v: i64| {
        move |m: &mut ModelProto| {
            let n = &mut m.graph.as_mut().unwrap().node[0];
            n.attribute.iter_mut().find(|a| a.name() == name).unwrap().i = Some(v);
        }
    };
    let first = "/0/MatMul_Q4";
    for (e, want) in [
        (edit(&set("K", 47)), "expected a last dim of K = 47"),
        (edit(&set("N", 41)), "has shape 40x2x16, expected 41x2x16"),
        (edit(&set("bits", 3)), "MatMulNBits with 3-bit codes"),
        (
            edit(&set("block_size", 24)),
            "block_size 24 is not a power of two",
        ),
        (
            edit(&|m: &mut ModelProto| {
                m.graph.as_mut().unwrap().node[0].input.truncate(2);
            }),
            "the scales (input 2) is missing",
        ),
    ] {
        assert!(e.contains(first) && e.contains(want), "{want}: {e}");
    }
}

/// `merge` writes a trained adapter into the quantized model's own file: each adapted
/// MatMulNBits becomes a MatMul with the merged f32 weight (and an Add of its bias input), its
/// quantized tensors go, and the merged file keeps its symbolic batch dim and gives the
/// unmerged adapter's outputs at another batch size than the one pinned.
#[test]
fn merge_writes_merged_layers_into_the_quantized_file() {
    let dir = temp_dir("quantized-merge");
    let mut rng = dorac::tensor::Rng::new(7);
    let mut random = |shape: Vec<usize>| {
        let n = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
        dorac::tensor::Array::from_f32(shape, &v)
    };
    let data: std::collections::BTreeMap<String, dorac::tensor::Array> = [
        ("x".to_string(), random(vec![6, 2, 48])),
        ("target".to_string(), random(vec![6, 2, 24])),
    ]
    .into();
    let data_path = dir.join("data.safetensors");
    dorac::tensors_io::write_safetensors(&data_path, &data).unwrap();
    let base = model("q4_float_zp_bias");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let ok = |args: &[&str]| dorac_ok(&dir, args);
    ok(&[
        "train",
        &s(&base),
        "--data",
        &s(&data_path),
        "--loss",
        "mse",
        "--steps",
        "3",
        "--batch-size",
        "3",
        "--lr",
        "1e-2",
        "-o",
        "adapter",
    ]);
    let said = ok(&[
        "merge",
        &s(&base),
        "--adapter",
        "adapter",
        "--shape",
        "batch=3",
        "-o",
        "merged.onnx",
    ]);
    assert!(
        said.contains("its other nodes and dims as they were"),
        "{said}"
    );
    let merged = dorac::onnx::load_model(&dir.join("merged.onnx")).unwrap();
    let graph = merged.graph.unwrap();
    let ops: Vec<&str> = graph.node.iter().map(|n| n.op_type()).collect();
    assert!(!ops.contains(&"MatMulNBits"), "{ops:?}");
    assert_eq!(ops.iter().filter(|&&o| o == "MatMul").count(), 2, "{ops:?}");
    let names: Vec<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let quantized =
        |n: &&str| n.ends_with("_Q4") || n.contains("scales") || n.contains("zero_points");
    assert!(!names.iter().any(quantized), "{names:?}");
    assert!(names.contains(&"0.bias"), "{names:?}");
    // Batch 5, where the merge pinned 3.
    let x = &data["x"];
    let x = dorac::tensor::Array::new(vec![5, 2, 48], x.data[..5 * 2 * 48].to_vec());
    let inputs = dir.join("x5.safetensors");
    dorac::tensors_io::write_safetensors(&inputs, &[("x".to_string(), x)].into()).unwrap();
    ok(&[
        "run",
        "merged.onnx",
        "--inputs",
        &s(&inputs),
        "--reference",
        "-o",
        "got.safetensors",
    ]);
    ok(&[
        "run",
        &s(&base),
        "--adapter",
        "adapter",
        "--inputs",
        &s(&inputs),
        "--reference",
        "-o",
        "want.safetensors",
    ]);
    let got = dorac::tensors_io::read_safetensors(&dir.join("got.safetensors")).unwrap();
    let want = dorac::tensors_io::read_safetensors(&dir.join("want.safetensors")).unwrap();
    assert_eq!(got["y"].shape, [5, 2, 24]);
    assert!(
        rel(&got, &want, "y") < 1e-5,
        "{:.2e}",
        rel(&got, &want, "y")
    );
}
