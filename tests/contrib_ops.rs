//! ONNX Runtime's fused transformer ops (com.microsoft) against onnxruntime's outputs
//! (`models/contrib/`, made by `models/make_contrib.py`; the domain has no conformance cases):
//! Attention in each mask form, after a past, with a bias and a wider V; the skip
//! normalizations; the GELU family; EmbedLayerNormalization; and a BERT as ONNX Runtime's
//! transformer optimizer fuses it, on a padded batch, run and rewritten.

mod common;

use common::*;

const CASES: [&str; 17] = [
    "attention_lengths",
    "attention_ends_starts",
    "attention_mask_2d",
    "attention_mask_3d",
    "attention_causal_past",
    "attention_hidden_rows",
    "attention_bias_scale",
    "attention_v_width",
    "skip_layer_norm",
    "skip_simplified_layer_norm",
    "gelu",
    "biasgelu",
    "fastgelu",
    "fastgelu_bias",
    "quickgelu",
    "embed_layer_norm",
    "bert_optimized",
];

#[test]
fn contrib_ops_match_onnxruntime() {
    for case in CASES {
        let path = models_dir().join("contrib").join(format!("{case}.onnx"));
        assert_matches_onnxruntime(&path, "contrib", case);
    }
}

/// The fused BERT's layers, the packed Q/K/V product of each Attention among them, are found
/// by `rewrite`, and the rewritten model (DoRA at PEFT's initialisation) still computes
/// onnxruntime's output.
#[test]
fn fused_bert_is_rewritten_into_dora() {
    let dir = temp_dir("contrib-rewrite");
    let model = models_dir().join("contrib/bert_optimized.onnx");
    let out = dir.join("rewritten.onnx");
    let r = dorac_in(
        &dir,
        &[
            "rewrite",
            model.to_str().unwrap(),
            "--shape",
            "batch_size=2",
            "--shape",
            "sequence_length=6",
            "-o",
            out.to_str().unwrap(),
        ],
    );
    let table = String::from_utf8_lossy(&r.stdout);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let modules: Vec<&str> = table
        .lines()
        .skip(2)
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| *m != "trainable" && *m != "wrote")
        .collect();
    let want: Vec<String> = (0..2)
        .flat_map(|i| {
            [
                format!("Attention_{i}"),
                format!("encoder.layer.{i}.attention.output.dense"),
                format!("encoder.layer.{i}.intermediate.dense"),
                format!("encoder.layer.{i}.output.dense"),
            ]
        })
        .collect();
    assert_eq!(modules, want, "{table}");
    let inputs = read("contrib", "bert_optimized.inputs.safetensors");
    let want = read("contrib", "bert_optimized.ort.safetensors");
    let got = run_reference(&load_path(&out, &inputs), &inputs);
    assert!(rel(&got, &want, "last_hidden_state") < 1e-5);
}
