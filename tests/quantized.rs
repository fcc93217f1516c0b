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
