//! A PEFT adapter folder: adapter_config.json and adapter_model.safetensors (the input split at
//! its first 0xFF byte), loaded and applied to the bundled mlp2d model.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn base() -> &'static dorac::ir::Graph {
    static BASE: OnceLock<dorac::ir::Graph> = OnceLock::new();
    BASE.get_or_init(|| {
        std::env::set_var("DORAC_MEMORY_BUDGET", "64M");
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/mlp2d/model.onnx");
        let model = dorac::onnx::load_model(&path).expect("the bundled model loads");
        let pins: std::collections::HashMap<String, usize> = [("batch".to_string(), 2)].into();
        dorac::onnx::import(&model, path.parent().unwrap(), &pins, &Default::default())
            .expect("the bundled model imports")
    })
}

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == 0xFF).unwrap_or(data.len());
    let Ok(config) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let weights = data.get(split + 1..).unwrap_or(&[]);
    let dir = std::path::Path::new("fuzz-adapter");
    let Ok(adapter) = dorac::adapter::from_parts(config, weights, dir) else {
        return;
    };
    let mut graph = base().clone();
    let _ = dorac::adapter::apply(&mut graph, &adapter);
});
