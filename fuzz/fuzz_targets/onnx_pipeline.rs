//! ONNX bytes -> import (shape inference included) -> constant folding -> DoRA rewrite of every
//! linear layer -> export. Anything may fail with an error; nothing may panic, hang or
//! allocate past the budget set below.
#![no_main]

use dorac::passes::{find_linear_layers, insert_adapters, AdapterInit, AdapterSpec};
use libfuzzer_sys::fuzz_target;
use std::collections::{HashMap, HashSet};

fuzz_target!(|data: &[u8]| {
    dorac_fuzz_budget();
    let Ok(model) = dorac::onnx::decode_model(data, "fuzz input") else {
        return;
    };
    // Common symbolic dim names get small sizes; a folder without files for external data.
    let pins: HashMap<String, usize> = ["batch", "seq", "sequence", "n", "N", "M", "K"]
        .iter()
        .map(|n| (n.to_string(), 2))
        .collect();
    let dir = std::path::Path::new("/nonexistent/dorac-fuzz");
    let Ok(mut graph) = dorac::onnx::import(&model, dir, &pins, &HashMap::new()) else {
        return;
    };
    if dorac::passes::fold_constants(&mut graph, &HashSet::new()).is_err() {
        return;
    }
    let specs: Vec<AdapterSpec> = find_linear_layers(&graph)
        .into_iter()
        .map(|layer| AdapterSpec {
            layer,
            method: dorac::ir::Method::Dora,
            rank: 2,
            alpha: 4.0,
            rslora: false,
            init: AdapterInit::Peft { seed: 0 },
        })
        .collect();
    if !specs.is_empty() && insert_adapters(&mut graph, specs).is_err() {
        return;
    }
    let _ = dorac::onnx::export(&graph);
});

/// A small memory budget, so a model asking for more is refused quickly (the fuzzer's
/// -rss_limit_mb catches anything allocated outside the budget's checks).
fn dorac_fuzz_budget() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| std::env::set_var("DORAC_MEMORY_BUDGET", "64M"));
}
