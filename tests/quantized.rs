//! Quantized models (`models/quantized/`, made by `models/make_quantized.py`): weight-only, ONNX
//! Runtime's MatMulNBits with 4- and 8-bit codes, blocks of 16 and 32 (a block running past K),
//! symmetric, packed and float zero points, a bias input; GatherBlockQuantized tables of int4
//! and uint4 codes; and quantized dynamically (DynamicQuantizeLinear, MatMulInteger). Each runs
//! on the GPU and the reference executor against onnxruntime's output, and the DoRA rewrite
//! adapts the weight-only ones' layers.

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

/// Token ids into an embedding table stored as GatherBlockQuantized (ONNX's uint4 codes with
/// uint4 zero points; int4 codes), then a MatMulNBits layer.
const EMBEDDED: [&str; 2] = ["embed_uint4", "embed_int4"];

fn model(variant: &str) -> std::path::PathBuf {
    models_dir()
        .join("quantized")
        .join(format!("{variant}.onnx"))
}

#[test]
fn quantized_models_match_onnxruntime() {
    for v in VARIANTS.iter().chain(&EMBEDDED) {
        let inputs = match EMBEDDED.contains(v) {
            true => read("quantized", "ids.safetensors"),
            false => read("quantized", "inputs.safetensors"),
        };
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

/// A GatherBlockQuantized whose attributes and tensors disagree is refused with the node named.
#[test]
fn malformed_gather_block_quantized_is_refused_with_the_node_named() {
    let edit = |f: &dyn Fn(&mut ModelProto)| {
        let mut m = dorac::onnx::load_model(&model("embed_uint4")).unwrap();
        let g = m.graph.as_mut().unwrap();
        let at = g
            .node
            .iter()
            .position(|n| n.op_type() == "GatherBlockQuantized")
            .unwrap();
        g.node.swap(0, at);
        f(&mut m);
        let pins = dorac::onnx::ShapePins::parse(&["batch=3"]).unwrap();
        match dorac::onnx::import(&m, Path::new("."), &pins, &Default::default()) {
            Ok(_) => panic!("imported"),
            Err(e) => e.to_string(),
        }
    };
    let set = |name: &'static str, v: i64| {
        move |m: &mut ModelProto| {
            let n = &mut m.graph.as_mut().unwrap().node[0];
            n.attribute.retain(|a| a.name() != name);
            n.attribute.push(dorac::onnx::proto::AttributeProto {
                name: Some(name.into()),
                i: Some(v),
                r#type: Some(2),
                ..Default::default()
            });
        }
    };
    for (e, want) in [
        (
            edit(&set("block_size", 24)),
            "block_size 24 is not a power of two",
        ),
        (
            edit(&set("block_size", 32)),
            "the scales are float32 100x3, expected floats of shape 100x2",
        ),
        (
            edit(&set("bits", 8)),
            "bits is 8, expected 2, 4 or 8 for uint8 codes, 4 for int4",
        ),
        (
            edit(&set("quantize_axis", 2)),
            "quantize_axis 2 is outside the table's 2 axes",
        ),
        (
            edit(&|m: &mut ModelProto| {
                let g = m.graph.as_mut().unwrap();
                let zero = g.node[0].input[3].clone();
                g.initializer.retain(|t| t.name() != zero);
                g.node[0].input[3] = g.node[0].input[2].clone();
            }),
            "the zero points are float32 100x3, expected codes of shape 100x3",
        ),
    ] {
        assert!(
            e.contains("GatherBlockQuantized") && e.contains(want),
            "{want}: {e}"
        );
    }
}

/// `merge --no-requantize` writes a trained adapter into the quantized model's own file: each
/// adapted MatMulNBits becomes a MatMul with the merged f32 weight (and an Add of its bias input),
/// its quantized tensors go, and the merged file keeps its symbolic batch dim and gives the
/// unmerged adapter's outputs at another batch size than the one pinned. Without the flag, each
/// layer is quantized again in the node's own layout (float zero points here): the nodes stay,
/// with new tensors, and every weight they read back is within half a step of its block's
/// scale of the f32 merged weight.
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
        "--no-requantize",
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
    let x5 = dorac::tensor::Array::new(vec![5, 2, 48], x.data[..5 * 2 * 48].to_vec());
    let inputs = dir.join("x5.safetensors");
    let x5: std::collections::BTreeMap<String, dorac::tensor::Array> =
        [("x".to_string(), x5)].into();
    dorac::tensors_io::write_safetensors(&inputs, &x5).unwrap();
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

    let said = ok(&[
        "merge",
        &s(&base),
        "--adapter",
        "adapter",
        "-o",
        "requantized.onnx",
    ]);
    assert!(
        said.contains("quantized 2 merged layers again")
            && said.contains("4 bits in blocks of 32")
            && said.contains("within 0.50 of its block's step"),
        "{said}"
    );
    let requantized = dorac::onnx::load_model(&dir.join("requantized.onnx")).unwrap();
    let graph = requantized.graph.as_ref().unwrap();
    let layers: Vec<_> = graph
        .node
        .iter()
        .filter(|n| n.op_type() == "MatMulNBits")
        .collect();
    assert_eq!(layers.len(), 2);
    let initializer = |name: &str| graph.initializer.iter().find(|t| t.name() == name);
    let f32s = |name: &str| -> Vec<f32> {
        let t = initializer(name).unwrap_or_else(|| panic!("no initializer '{name}'"));
        t.raw_data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    // The f32 merged weights, and the requantized ones as dorac reads them back.
    let exact = load_path(&dir.join("merged.onnx"), &x5);
    let read_back = load_path(&dir.join("requantized.onnx"), &x5);
    for node in layers {
        for (i, input) in node.input[1..4].iter().enumerate() {
            assert!(input.ends_with("_merged"), "input {} is {input}", i + 1);
        }
        let attr = |n: &str| node.attribute.iter().find(|a| a.name() == n).unwrap().i() as usize;
        let (k, n, block) = (attr("K"), attr("N"), attr("block_size"));
        let blocks = k.div_ceil(block);
        let scales = f32s(&node.input[2]);
        assert_eq!(scales.len(), n * blocks);
        let weight = |g: &dorac::ir::Graph, name: &str| {
            let id = g
                .find_by_name(name)
                .unwrap_or_else(|| panic!("no '{name}'"));
            g.const_tensor(id).unwrap().to_f32()
        };
        // `--no-requantize` named the f32 weight as this names the codes.
        let w = weight(&exact, &node.input[1]);
        let q = weight(&read_back, &format!("{}/weight", node.output[0]));
        assert_eq!(w.len(), k * n);
        for (i, (a, b)) in w.iter().zip(&q).enumerate() {
            let step = scales[(i % n) * blocks + (i / n) / block].abs();
            assert!(
                (a - b).abs() <= 0.5 * step * (1.0 + 1e-5) + 1e-7,
                "{}: weight {i} is {a}, read back as {b} (step {step})",
                node.name()
            );
        }
    }
    // The layers' old quantized tensors are gone; the bias stays.
    let names: Vec<&str> = graph.initializer.iter().map(|t| t.name()).collect();
    let old =
        |n: &&str| n.ends_with("_Q4") || n.ends_with("_scales") || n.ends_with("_zero_points");
    assert!(!names.iter().any(old), "{names:?}");
    assert!(names.contains(&"0.bias"), "{names:?}");
}

/// An adapter at PEFT's initialisation (B = 0) leaves each layer's weight as it was: merged into
/// each weight-only file, every layer is quantized again to the codes and zero points ONNX
/// Runtime's quantizer wrote into it, and its scales within float rounding. This holds the
/// re-quantizer to the layout and the rounding scheme of the files (symmetric, packed and float
/// zero points, 4 and 8 bits, a block running past K).
#[test]
fn an_unchanged_layer_is_quantized_again_to_the_files_own_codes() {
    let dir = temp_dir("quantized-requantize-identity");
    for v in &VARIANTS[..4] {
        let base = model(v);
        let init = dir.join(format!("{v}-init"));
        let merged = dir.join(format!("{v}.onnx"));
        let path = |p: &Path| p.to_str().unwrap().to_string();
        dorac_ok(
            &dir,
            &[
                "rewrite",
                &path(&base),
                "--shape",
                "batch=3",
                "--adapter-out",
                &path(&init),
                "-o",
                "rewritten.onnx",
            ],
        );
        dorac_ok(
            &dir,
            &[
                "merge",
                &path(&base),
                "--adapter",
                &path(&init),
                "-o",
                &path(&merged),
            ],
        );
        let tensors = |p: &Path| {
            let m = dorac::onnx::load_model(p).unwrap();
            let g = m.graph.unwrap();
            g.node
                .iter()
                .filter(|n| n.op_type() == "MatMulNBits")
                .map(|n| {
                    let t = |i: usize| {
                        n.input.get(i).and_then(|name| {
                            g.initializer.iter().find(|t| t.name() == name).cloned()
                        })
                    };
                    (t(1).unwrap(), t(2).unwrap(), t(3))
                })
                .collect::<Vec<_>>()
        };
        let (want, got) = (tensors(&base), tensors(&merged));
        assert_eq!(want.len(), got.len(), "{v}");
        for ((codes, scales, zero), (codes2, scales2, zero2)) in want.iter().zip(&got) {
            assert!(codes2.name().ends_with("_merged"), "{v}: {}", codes2.name());
            assert_eq!(codes.dims, codes2.dims, "{v}");
            assert_eq!(codes.raw_data(), codes2.raw_data(), "{v}: {}", codes.name());
            assert_eq!(scales.data_type, scales2.data_type, "{v}");
            let floats = |t: &dorac::onnx::proto::TensorProto| -> Vec<f32> {
                t.raw_data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect()
            };
            for (a, b) in floats(scales).iter().zip(floats(scales2)) {
                assert!((a - b).abs() <= 1e-6 * a.abs(), "{v}: scale {a} became {b}");
            }
            match (zero, zero2) {
                (None, None) => {}
                // uint8: packed codes.
                (Some(z), Some(z2)) if z.data_type() == 2 => {
                    assert_eq!(z.raw_data(), z2.raw_data(), "{v}: zero points")
                }
                (Some(z), Some(z2)) => {
                    for (a, b) in floats(z).iter().zip(floats(z2)) {
                        assert!((a - b).abs() <= 1e-5, "{v}: zero point {a} became {b}");
                    }
                }
                _ => panic!("{v}: the zero points changed form"),
            }
        }
    }
}
