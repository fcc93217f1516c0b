//! A training data file for the bundled mlp2d model with a cross-entropy loss over its 4
//! outputs: parsed and checked (names, dtypes, shapes, label ranges), then batched.
#![no_main]

use dorac::train::data::{from_tensors, Expected};
use dorac::train::LossKind;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = dorac::tensors_io::parse_safetensors_typed(data, "fuzz input") else {
        return;
    };
    let loss = LossKind::CrossEntropy { ignore_index: -100 };
    let want = Expected {
        inputs: vec![("x".into(), vec![16], false)],
        labels: "labels",
        label_shape: vec![],
        loss,
        classes: Some(4),
    };
    let Ok(set) = from_tensors(std::path::Path::new("fuzz.safetensors"), raw, &want) else {
        return;
    };
    if let Ok(per_epoch) = set.batches_per_epoch(2.min(set.examples)) {
        let order = set.order(1, 0, true);
        for b in 0..per_epoch.min(4) {
            let _ = set.batch(&order, b, 2.min(set.examples));
        }
    }
});
