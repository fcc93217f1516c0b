//! Helpers shared by the integration tests: the bundled models, one GPU per test binary, temp
//! folders.
#![allow(dead_code)]

use dorac::ir::Graph;
use dorac::tensor::Array;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::OnceLock;

pub fn models_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
}

pub fn read(name: &str, file: &str) -> BTreeMap<String, Array> {
    dorac::tensors_io::read_safetensors(&models_dir().join(name).join(file)).unwrap()
}

/// Imports a bundled model with its inputs' shapes pinned.
pub fn load(name: &str) -> Graph {
    let path = models_dir().join(name).join("model.onnx");
    load_path(&path, &read(name, "inputs.safetensors"))
}

pub fn load_path(path: &std::path::Path, inputs: &BTreeMap<String, Array>) -> Graph {
    let model = dorac::onnx::load_model(path).unwrap();
    let shapes: HashMap<String, Vec<usize>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.shape.clone()))
        .collect();
    dorac::onnx::import(
        &model,
        path.parent().unwrap(),
        &dorac::onnx::ShapePins::default(),
        &shapes,
    )
    .unwrap()
}

/// The GPU, or a failure that says how to get one: tests never skip the GPU path.
pub fn gpu() -> &'static dorac::runtime::Gpu {
    static GPU: OnceLock<dorac::runtime::Gpu> = OnceLock::new();
    GPU.get_or_init(|| {
        dorac::runtime::Gpu::new(None).unwrap_or_else(|e| {
            panic!("{e}\nthe GPU tests need a wgpu adapter: run scripts/install-vulkan.sh (Debian: apt-get install mesa-vulkan-drivers)")
        })
    })
}

pub fn run_gpu(graph: &Graph, inputs: &BTreeMap<String, Array>) -> BTreeMap<String, Array> {
    let host: HashMap<String, Vec<f32>> = inputs
        .iter()
        .map(|(k, v)| (k.clone(), v.data.iter().map(|&x| x as f32).collect()))
        .collect();
    let out = dorac::runtime::run_graph(gpu(), graph, &host).unwrap();
    out.into_iter()
        .map(|(k, v)| {
            let id = graph.outputs().iter().find(|(n, _)| *n == k).unwrap().1;
            (k, Array::from_f32(graph.shape(id).to_vec(), &v))
        })
        .collect()
}

pub fn run_reference(graph: &Graph, inputs: &BTreeMap<String, Array>) -> BTreeMap<String, Array> {
    let inputs: HashMap<String, Array> = inputs.clone().into_iter().collect();
    dorac::reference::run(graph, &inputs)
        .unwrap()
        .into_iter()
        .collect()
}

pub fn rel(a: &BTreeMap<String, Array>, b: &BTreeMap<String, Array>, key: &str) -> f64 {
    dorac::tensor::relative_error(&a[key].data, &b[key].data)
}

/// Training options for an MSE step on the `target` tensor with AdamW at lr 1e-2 (PyTorch's
/// other defaults), nothing exposed, every layer's weights for `full`.
pub fn mse_options(method: dorac::train::TrainMethod) -> dorac::train::BuildOptions {
    dorac::train::BuildOptions {
        method,
        loss: dorac::train::LossKind::Mse,
        output: None,
        labels: "target".into(),
        optimizer: dorac::train::AdamW {
            lr: 1e-2,
            ..dorac::train::AdamW::default()
        },
        exact_norm_grad: false,
        expose_grads: false,
        full_targets: None,
        lean_activations: true, // as `dorac train` does
    }
}

/// A fresh, empty folder for one test.
pub fn temp_dir(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dorac-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub const MODELS: [&str; 2] = ["mlp2d", "mlp3d"];

/// Runs the dorac binary with `cwd` as its working directory.
pub fn dorac_in(cwd: &std::path::Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_dorac"))
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("the dorac binary runs")
}

/// Runs the dorac binary in `cwd`, asserts that it succeeded (its stderr otherwise), and returns
/// its stdout.
pub fn dorac_ok(cwd: &std::path::Path, args: &[&str]) -> String {
    let out = dorac_in(cwd, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A copy of the PEFT adapter folder `src` at `dst`, its config edited by `config` and its
/// tensors by `tensors`.
pub fn edited_adapter(
    src: &std::path::Path,
    dst: &std::path::Path,
    config: impl Fn(&mut serde_json::Value),
    tensors: impl Fn(&mut BTreeMap<String, Array>),
) -> PathBuf {
    std::fs::create_dir_all(dst).unwrap();
    let text = std::fs::read_to_string(src.join("adapter_config.json")).unwrap();
    let mut c: serde_json::Value = serde_json::from_str(&text).unwrap();
    config(&mut c);
    std::fs::write(dst.join("adapter_config.json"), c.to_string()).unwrap();
    let mut t =
        dorac::tensors_io::read_safetensors(&src.join("adapter_model.safetensors")).unwrap();
    tensors(&mut t);
    dorac::tensors_io::write_safetensors(&dst.join("adapter_model.safetensors"), &t).unwrap();
    dst.to_path_buf()
}

/// Runs `model` on `<folder>/<case>.inputs.safetensors` on the GPU and the reference executor,
/// and checks every output of `<folder>/<case>.ort.safetensors` (onnxruntime's) within 1e-5.
pub fn assert_matches_onnxruntime(model: &std::path::Path, folder: &str, case: &str) {
    let inputs = read(folder, &format!("{case}.inputs.safetensors"));
    let g = load_path(model, &inputs);
    assert_outputs_match(&g, &inputs, folder, &format!("{case}.ort.safetensors"));
}

/// Runs `g` on `inputs` on the GPU and the reference executor, and checks every output that
/// `<folder>/<expected>` holds within 1e-5.
pub fn assert_outputs_match(
    g: &Graph,
    inputs: &BTreeMap<String, Array>,
    folder: &str,
    expected: &str,
) {
    let want = read(folder, expected);
    let reference = run_reference(g, inputs);
    let gpu = run_gpu(g, inputs);
    for name in want.keys() {
        let (r, d) = (rel(&reference, &want, name), rel(&gpu, &want, name));
        assert!(
            r < 1e-5 && d < 1e-5,
            "{folder}/{expected} {name}: reference {r:.2e}, gpu {d:.2e}"
        );
    }
}
