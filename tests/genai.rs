//! Decoders as onnxruntime-genai's model builder exports them (`models/genai/`, made by
//! `models/make_genai.py`): GroupQueryAttention with its cache, rotary and masks inside,
//! SimplifiedLayerNormalization, SkipSimplifiedLayerNormalization and SkipLayerNormalization.
//! Every output of every case (an empty cache, padding, one token after a cache, a batch whose
//! sequences have different lengths, several tokens after a cache) on the GPU and the reference
//! executor against onnxruntime's; then training and the DoRA rewrite of one, and PEFT adapters
//! made on the Hugging Face models applied to the builder's renamed and packed layers.

mod common;

use common::*;
use dorac::tensor::Array;

const VARIANTS: [&str; 6] = [
    "llama",
    "qwen3",
    "phi",
    "phi3",
    "qwen2_int4",
    "llama_window",
];
const CASES: [&str; 5] = ["prompt", "padded", "decode", "ragged_decode", "chunk"];

fn dir(variant: &str) -> String {
    format!("genai/{variant}")
}

#[test]
fn genai_decoders_match_onnxruntime() {
    for v in VARIANTS {
        let path = models_dir().join(dir(v)).join("model.onnx");
        for case in CASES {
            assert_matches_onnxruntime(&path, &dir(v), case);
        }
    }
}

/// The builder's module names (`model.layers.0.attn.qkv_proj`, from weights named
/// `<module>.MatMul.weight`) are what `--target` matches, the rotary caches are not listed as
/// layers, and a training run on the GPU follows the reference executor's losses.
#[test]
fn genai_decoders_train_with_dora() {
    let tmp = temp_dir("genai-train");
    let model = models_dir().join(dir("llama")).join("model.onnx");
    let data = models_dir().join("genai/train.safetensors");
    let losses = |reference: bool| -> Vec<f64> {
        let out = tmp.join(if reference { "ref" } else { "gpu" });
        let mut args = vec![
            "train",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--loss",
            "lm",
            "--steps",
            "3",
            "--batch-size",
            "3",
            "--rank",
            "4",
            "--lr",
            "1e-2",
            "--target",
            "qkv_proj,o_proj,down_proj",
            // The cache, absent from the data, is empty without a pin.
            "--shape",
            "kv_cache_dim=16",
            "-o",
            out.to_str().unwrap(),
        ];
        if reference {
            args.push("--reference");
        }
        let run = dorac_in(&tmp, &args);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::read_to_string(out.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                v["loss"].as_f64().unwrap()
            })
            .collect()
    };
    let (gpu, reference) = (losses(false), losses(true));
    assert_eq!(gpu.len(), 3);
    for (g, r) in gpu.iter().zip(&reference) {
        assert!((g - r).abs() <= 1e-5 * r.abs(), "{gpu:?} vs {reference:?}");
    }
    let adapter = std::fs::read_to_string(tmp.join("gpu/adapter_config.json")).unwrap();
    assert!(adapter.contains("qkv_proj"), "{adapter}");
    merged_in_place(&tmp, &model, &tmp.join("gpu"));

    let rewrite = dorac_in(
        &tmp,
        &[
            "rewrite",
            model.to_str().unwrap(),
            "--shape",
            "batch_size=2",
            "--shape",
            "sequence_length=5",
            "--shape",
            "total_sequence_length=5",
            "--shape",
            "past_sequence_length=0",
            "--shape",
            "kv_cache_dim=16",
            "-o",
            tmp.join("rewritten.onnx").to_str().unwrap(),
        ],
    );
    let table = String::from_utf8_lossy(&rewrite.stdout);
    assert!(
        rewrite.status.success(),
        "{}",
        String::from_utf8_lossy(&rewrite.stderr)
    );
    let modules: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|m| m.starts_with("model.") || m.starts_with("lm_head"))
        .collect();
    let want: Vec<String> = (0..2)
        .flat_map(|i| {
            [
                "attn.qkv_proj",
                "attn.o_proj",
                "mlp.up_proj",
                "mlp.gate_proj",
                "mlp.down_proj",
            ]
            .map(|m| format!("model.layers.{i}.{m}"))
        })
        .chain(["lm_head".to_string()])
        .collect();
    assert_eq!(modules, want, "{table}");
    // DoRA at PEFT's initialisation: the rewritten model gives the base model's outputs.
    let inputs = read(&dir("llama"), "prompt.inputs.safetensors");
    let want = read(&dir("llama"), "prompt.ort.safetensors");
    let got = run_reference(&load_path(&tmp.join("rewritten.onnx"), &inputs), &inputs);
    assert!(rel(&got, &want, "logits") < 1e-5);
}

/// PEFT adapters made on the Hugging Face models (`models/make_genai_peft.py`) apply to the
/// builder's export of them, whose modules are renamed and packed: q_proj and v_proj (no k_proj)
/// into qkv_proj with llama's DoRA, all three with llama's rsLoRA, with their own ranks and
/// alphas in phi's, Phi's dense as o_proj, and Phi-3's gate_up_proj split into gate_proj and
/// up_proj. onnxruntime on the builder's export of the model PEFT merged each adapter into is
/// the reference, unmerged here and merged into the file by `merge`.
#[test]
fn peft_adapters_apply_to_builder_exports() {
    let tmp = temp_dir("genai-peft");
    let adapters = [
        ("llama", "peft_dora", 8),
        ("llama", "peft_lora", 2),
        ("phi", "peft_dora", 6),
        ("phi3", "peft_dora", 10),
    ];
    for (variant, name, layers) in adapters {
        let folder = models_dir().join(dir(variant));
        let model = folder.join("model.onnx");
        let inputs = read(&dir(variant), "prompt.inputs.safetensors");
        let expected = format!("{name}.ort.safetensors");
        let mut g = load_path(&model, &inputs);
        let adapter = dorac::adapter::load(&folder.join(name)).unwrap();
        assert_eq!(dorac::adapter::apply(&mut g, &adapter).unwrap(), layers);
        assert_outputs_match(&g, &inputs, &dir(variant), &expected);

        let merged = tmp.join(format!("{variant}-{name}.onnx"));
        let adapter = folder.join(name);
        dorac_ok(
            &tmp,
            &[
                "merge",
                model.to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "-o",
                merged.to_str().unwrap(),
            ],
        );
        let got = run_reference(&load_path(&merged, &inputs), &inputs);
        let want = read(&dir(variant), &expected);
        let e = rel(&got, &want, "logits");
        assert!(e < 1e-5, "{variant}/{name} merged: {e:.2e}");
    }
}

/// A packed layer's adapter is saved as PEFT modules of its blocks (`q_proj`, `k_proj`, `v_proj`,
/// A shared, k's too though the adapter had none), under the Hugging Face names, so PEFT loads
/// it on that model (checked by hand: a dorac-trained one gives PEFT's logits within 2.2e-7).
/// Applied again, the blocks' shared A packs into one adapter of the same rank, which still
/// computes onnxruntime's outputs for the PEFT-merged model.
#[test]
fn packed_adapters_are_saved_as_their_peft_modules() {
    let tmp = temp_dir("genai-peft-save");
    let folder = models_dir().join(dir("llama"));
    let inputs = read(&dir("llama"), "prompt.inputs.safetensors");
    let mut g = load_path(&folder.join("model.onnx"), &inputs);
    let adapter = dorac::adapter::load(&folder.join("peft_dora")).unwrap();
    dorac::adapter::apply(&mut g, &adapter).unwrap();
    dorac::adapter::save(&g, &tmp.join("saved")).unwrap();

    let saved = dorac::adapter::load(&tmp.join("saved")).unwrap();
    let attn = |m: &str| format!("model.layers.0.self_attn.{m}");
    let a = |m: &str| &saved.layers[&attn(m)].a;
    assert_eq!(a("q_proj").shape, [8, 32], "q and v's rank-4 As, stacked");
    assert!(a("q_proj") == a("k_proj") && a("k_proj") == a("v_proj"));
    let b_k = &saved.layers[&attn("k_proj")].b;
    assert_eq!(b_k.shape, [16, 8]);
    assert!(b_k.data.iter().all(|&v| v == 0.0), "k had no adapter");
    assert!(!saved.layers.keys().any(|m| m.contains("qkv_proj")));
    for m in ["q_proj", "k_proj", "v_proj", "o_proj"] {
        assert!(saved.config.target_modules.contains(&m.to_string()), "{m}");
    }

    let mut again = load_path(&folder.join("model.onnx"), &inputs);
    assert_eq!(dorac::adapter::apply(&mut again, &saved).unwrap(), 8);
    let qkv = again
        .adapters()
        .iter()
        .find(|a| a.module.ends_with("0.attn.qkv_proj"))
        .unwrap()
        .rank;
    assert_eq!(qkv, 8, "the shared A packs once");
    assert_outputs_match(&again, &inputs, &dir("llama"), "peft_dora.ort.safetensors");
}

/// A block that does not fit the packed layer is refused with the module named: llama's q_proj
/// with half its outputs leaves qkv_proj's q block (32 outputs, beside v's 16) unfilled.
#[test]
fn a_block_that_does_not_fit_the_packed_layer_is_refused() {
    let tmp = temp_dir("genai-peft-misfit");
    let folder = models_dir().join(dir("llama"));
    let q_b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let q_m = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector";
    let adapter = edited_adapter(
        &folder.join("peft_dora"),
        &tmp.join("misfit"),
        |_| {},
        |t| {
            for key in [q_b, q_m] {
                let v = &t[key];
                let rows = v.shape[0] / 2;
                let keep = v.data.len() / 2;
                let shape = [&[rows][..], &v.shape[1..]].concat();
                t.insert(key.into(), Array::new(shape, v.data[..keep].to_vec()));
            }
        },
    );
    let inputs = read(&dir("llama"), "prompt.inputs.safetensors");
    let mut g = load_path(&folder.join("model.onnx"), &inputs);
    let e = dorac::adapter::apply(&mut g, &dorac::adapter::load(&adapter).unwrap())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("module 'model.layers.0.self_attn.q_proj'")
            && e.contains("packed 'model.layers.0.attn.qkv_proj'")
            && e.contains("outputs 0..32 of 64"),
        "{e}"
    );
}

/// `merge` of the trained adapter, with no `--shape`, writes the builder's own file with the
/// merged weights: its GroupQueryAttention nodes and symbolic dims stay, so the merged model
/// runs any shape (a ragged decode here), and gives the unmerged adapter's outputs.
fn merged_in_place(tmp: &std::path::Path, model: &std::path::Path, adapter: &std::path::Path) {
    let merged = tmp.join("merged.onnx");
    // No --shape: the merge keeps the file's dims, so none needs a size.
    let args = [
        "merge",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "-o",
        merged.to_str().unwrap(),
    ];
    let out = dorac_in(tmp, &args);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("its other nodes and dims as they were"),
        "{said}"
    );
    let file = dorac::onnx::load_model(&merged).unwrap();
    let graph = file.graph.as_ref().unwrap();
    let attention = graph
        .node
        .iter()
        .filter(|n| n.op_type() == "GroupQueryAttention")
        .count();
    assert_eq!(attention, 2);
    use dorac::onnx::proto::{tensor_shape_proto::dimension::Value as Dim, type_proto::Value};
    let Some(Value::TensorType(t)) = graph.input[0].r#type.as_ref().and_then(|t| t.value.clone())
    else {
        panic!("input_ids has no tensor type");
    };
    let dims: Vec<String> = t
        .shape
        .unwrap()
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(Dim::DimParam(p)) => p.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(dims, ["batch_size", "sequence_length"]);
    let inputs = models_dir()
        .join(dir("llama"))
        .join("ragged_decode.inputs.safetensors");
    let run = |m: &std::path::Path, with_adapter: bool, o: &str| {
        let mut a = vec![
            "run",
            m.to_str().unwrap(),
            "--inputs",
            inputs.to_str().unwrap(),
        ];
        if with_adapter {
            a.extend(["--adapter", adapter.to_str().unwrap()]);
        }
        a.extend(["--reference", "-o", o]);
        let r = dorac_in(tmp, &a);
        assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
        dorac::tensors_io::read_safetensors(&tmp.join(o)).unwrap()
    };
    let got = run(&merged, false, "merged.safetensors");
    let want = run(model, true, "unmerged.safetensors");
    for name in want.keys() {
        assert!(
            rel(&got, &want, name) < 1e-5,
            "{name}: {:.2e}",
            rel(&got, &want, name)
        );
    }
    let base = read(&dir("llama"), "ragged_decode.ort.safetensors");
    assert!(
        rel(&got, &base, "logits") > 1e-3,
        "the adapter changed nothing"
    );
}

/// Beside the builder's `genai_config.json`, `train` needs no `--shape` at all: the cache the data
/// does not hold is empty, and its head size (`kv_cache_dim`) is the config's `head_size`.
#[test]
fn genai_folders_train_without_pins() {
    let tmp = temp_dir("genai-no-pins");
    let src = models_dir().join(dir("llama"));
    for f in ["model.onnx", "model.onnx.data"] {
        std::fs::copy(src.join(f), tmp.join(f)).unwrap();
    }
    let config =
        r#"{"model": {"type": "llama", "decoder": {"head_size": 16, "num_key_value_heads": 1}}}"#;
    std::fs::write(tmp.join("genai_config.json"), config).unwrap();
    let data = models_dir().join("genai/train.safetensors");
    let args = [
        "train",
        "model.onnx",
        "--data",
        data.to_str().unwrap(),
        "--loss",
        "lm",
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--reference",
        "-o",
        "adapter",
    ];
    let run = dorac_in(&tmp, &args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::remove_file(tmp.join("genai_config.json")).unwrap();
    let run = dorac_in(&tmp, &args);
    let e = String::from_utf8_lossy(&run.stderr);
    assert!(
        !run.status.success() && e.contains("kv_cache_dim") && e.contains("head_size"),
        "{e}"
    );
}

/// Token ids outside the embedding table are refused before anything runs, by `run` and by
/// `train` (the GPU would read zeros for them), with the tensor and the table's size named.
#[test]
fn ids_outside_the_vocabulary_are_refused() {
    let tmp = temp_dir("genai-bad-ids");
    let model = models_dir().join(dir("llama")).join("model.onnx");
    let mut inputs = read(&dir("llama"), "prompt.inputs.safetensors");
    inputs.get_mut("input_ids").unwrap().data[3] = 96.0;
    let e = run_refused(&tmp, &model, inputs);
    assert!(
        e.contains("'input_ids' holds 96 (element 3)") && e.contains("96 rows"),
        "{e}"
    );
    let mut data = read("genai", "train.safetensors");
    data.get_mut("input_ids").unwrap().data[10] = 200.0;
    let bad = tmp.join("data.safetensors");
    write_ints(&bad, data);
    let train = dorac_in(
        &tmp,
        &[
            "train",
            model.to_str().unwrap(),
            "--data",
            bad.to_str().unwrap(),
            "--loss",
            "lm",
            "--shape",
            "kv_cache_dim=16",
            "-o",
            "adapter",
        ],
    );
    let e = String::from_utf8_lossy(&train.stderr);
    assert!(
        !train.status.success() && e.contains("'input_ids' holds 200"),
        "{e}"
    );
}

/// A sequence longer than the rotary caches (32 positions, the model's max_position_embeddings) is
/// refused at import, with the node and the sizes named, not run on rows past the cache's end.
#[test]
fn sequences_past_the_rotary_cache_are_refused() {
    let tmp = temp_dir("genai-long");
    let model = models_dir().join(dir("llama")).join("model.onnx");
    let mut inputs = read(&dir("llama"), "prompt.inputs.safetensors");
    let long = 33;
    inputs.insert(
        "input_ids".into(),
        Array::new(vec![1, long], vec![5.0; long]),
    );
    inputs.insert(
        "attention_mask".into(),
        Array::new(vec![1, long], vec![1.0; long]),
    );
    for (_, v) in inputs.iter_mut().filter(|(k, _)| k.starts_with("past")) {
        *v = Array::new(vec![1, v.shape[1], 0, v.shape[3]], vec![]);
    }
    let e = run_refused(&tmp, &model, inputs);
    assert!(
        e.contains("GroupQueryAttention")
            && e.contains("total_sequence_length 33 reaches position 32")
            && e.contains("32 rows"),
        "{e}"
    );
}

/// `dorac run` of `model` on `inputs`, which must fail and write nothing: its error output.
fn run_refused(
    tmp: &std::path::Path,
    model: &std::path::Path,
    inputs: std::collections::BTreeMap<String, Array>,
) -> String {
    let path = tmp.join("inputs.safetensors");
    write_ints(&path, inputs);
    let args = [
        "run",
        model.to_str().unwrap(),
        "--inputs",
        path.to_str().unwrap(),
        "-o",
        "y.safetensors",
    ];
    let run = dorac_in(tmp, &args);
    assert!(!run.status.success(), "{args:?} ran");
    assert!(!tmp.join("y.safetensors").exists());
    String::from_utf8_lossy(&run.stderr).into_owned()
}

/// Writes the tensors with the ids and masks as int64, the rest as float32.
fn write_ints(path: &std::path::Path, tensors: std::collections::BTreeMap<String, Array>) {
    use dorac::tensor::DType;
    let typed = tensors
        .into_iter()
        .map(|(k, a)| {
            let t = if k.starts_with("past") {
                DType::F32
            } else {
                DType::I64
            };
            (k, (a, t))
        })
        .collect();
    dorac::tensors_io::write_safetensors_typed(path, &typed).unwrap();
}
